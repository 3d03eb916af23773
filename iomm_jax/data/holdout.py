"""The held-out split: which records training never reads, and the fixed validation examples drawn from them.

Three ways to a held-out set, in this order:

- ``data.val_path``: a separate set of ``data.source``'s kind (with ``data.cached``, a feature cache of it);
- ``data.val_fraction`` = f: a seeded random choice of ⌈f·N⌉ of ``data.path``'s N records (the same choice on every
  process, run and resume, for a given ``data.seed``); training reads only the rest (:func:`train_source`);
- procedural shapes without either: another draw of the world (``sources.heldout_source``), which no stage reads.

Other sources without ``val_*`` have no held-out set: validation losses are off and training-time grids show text
prompts only. ``pipeline.load_examples`` turns the first ``data.val_num`` held-out records into one fixed batch
through the training pipeline's own preprocessing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from iomm_jax.data import buckets as buckets_lib
from iomm_jax.data import data_config, mix, sources

SPLIT_SALT = 0x5A1D  # the held-out choice's seed is derived from data.seed with this salt


class Subset:
  """The records ``indices`` of ``parent``, renumbered 0…len−1 (reads, captions, ids and sizes pass through)."""

  def __init__(self, parent: Any, indices: np.ndarray):
    self.parent, self.indices = parent, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.parent[int(self.indices[int(i)])]

  def caption(self, i: int) -> str | None:
    j = int(self.indices[int(i)])
    return self.parent.caption(j) if hasattr(self.parent, "caption") else self.parent[j].get("caption")

  @property
  def ids(self) -> list | None:
    ids = getattr(self.parent, "ids", None)
    return None if ids is None else [ids[int(j)] for j in self.indices]

  def sizes(self) -> np.ndarray:
    return buckets_lib.record_sizes(self.parent)[self.indices]

  @property
  def field(self) -> str | None:
    """The config field of the parent's path (sources.make_source), for messages."""
    return getattr(self.parent, "field", None)

  @property
  def where(self) -> str | None:
    return getattr(self.parent, "where", None)


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(training indices, held-out indices) of n records, each sorted: a seeded choice of ⌈fraction·n⌉ held out."""
  if not fraction:
    return np.arange(n, dtype=np.int64), np.zeros((0,), np.int64)
  k = math.ceil(round(fraction * n, 6))  # rounded first: 0.07 × 100 is 7.000000000000001 in floating point, not 8
  if k >= n:
    raise data_config.DataConfigError(
        f"config.data.val_fraction={fraction} holds out all {n} records of the dataset; lower it or set data.val_path"
    )
  chosen = np.random.default_rng(mix.derived_seed(seed, SPLIT_SALT)).permutation(n)[:k]
  held = np.zeros(n, bool)
  held[chosen] = True
  return np.flatnonzero(~held), np.flatnonzero(held)


def train_source(data_cfg: Any, workdir: str | None = None) -> Any:
  """The records training reads: ``data.path``'s source without the held-out fraction (all of it otherwise)."""
  d = data_config.from_config(data_cfg)
  source = sources.make_source(d, workdir)
  if not d.val_fraction:
    return source
  train, _ = split_indices(len(source), d.val_fraction, d.seed)
  return Subset(source, train)


def val_source(data_cfg: Any, workdir: str | None = None) -> Any | None:
  """The held-out records (module docstring), or None where the source has no held-out set."""
  d = data_config.from_config(data_cfg)
  if d.val_path:  # errors name data.val_path, the field the user set, not the data.path it stands in for
    if d.cached:
      return sources.make_source(dataclasses.replace(d, cache_path=d.val_path), workdir, "data.val_path")
    # shapes with a val_path: a folder of another draw of the world (the training world is data.shapes_seed)
    held = dataclasses.replace(d, path=d.val_path, num_images=d.val_num, shapes_seed=sources.heldout_world_seed(d))
    return sources.make_source(held, workdir, "data.val_path")
  if d.val_fraction:
    source = sources.make_source(d, workdir)
    _, held = split_indices(len(source), d.val_fraction, d.seed)
    return Subset(source, held)
  if d.source == "shapes" and not d.cached:
    return sources.heldout_source(d, d.val_num)
  return None
