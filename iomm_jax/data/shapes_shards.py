"""The shapes world (data/shapes.py) written as ArrayRecord shards through ``prepare`` (resumable, sharded like any
prepared dataset). Kept apart from shapes.py so that the world itself depends on nothing in the data package."""

from __future__ import annotations

import functools
import os

from iomm_jax.data import prepare, prepare_items, shapes


def write_arrayrecord(
    dst: str | os.PathLike,
    num: int,
    resolution: int,
    seed: int = 0,
    shards: int = 1,
    workers: int = 0,
    progress: bool = True,
) -> dict:
  """Writes ``num`` shapes images as ArrayRecord shards in ``dst`` through ``prepare``; returns prepare's summary."""
  items = [
      prepare_items.Item(
          key=f"shapes-s{seed}-r{resolution}/{i:08d}",
          loader=functools.partial(shapes.render_png, i, resolution, seed),
      )
      for i in range(num)
  ]
  return prepare.write_shards(
      items,
      dst,
      shards,
      workers=workers,
      min_size=0,
      fingerprint={"source": shapes.dataset_params(num, resolution, seed)},
      progress=progress,
  )
