"""The output folder of a resumable shard writer (`data.prepare`, the feature cache).

Such a writer adds its shards to the folder and resumes its own earlier output there, so `--dst` must be new, empty
or hold only that writer's files (its hidden state folder, its shards, the temporaries a kill left): anything else —
a training workdir, another tool's shards, the images being read — would be mixed with the shards. Nor may it be,
hold or lie inside the input the shards are made from.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Sequence

from iomm_jax import output_folder


def own_files(state_dir: str, shard_glob: str) -> tuple[str, ...]:
  """The glob patterns of what a writer keeps in its folder: its state folder, its shards (`shard_glob`) and their
  hidden temporaries (`output_folder.atomic_file(..., keep_suffix=False)`: ``.NAME.tmp-*``)."""
  return (state_dir, shard_glob, f".{shard_glob}.tmp-*")


def check(
    dst: str | os.PathLike,
    own: Sequence[str],
    *,
    tool: str,
    source: str | os.PathLike | None = None,
    source_flag: str = "--src",
) -> None:
  """Raises ValueError (one line naming --dst) unless `dst` can take `tool`'s shards: not a file, neither it nor a
  folder of it the input `source` (named by `source_flag`), and new, empty or holding only entries matching `own`
  (own_files). Checked before any work, and again by `make`."""
  dst = Path(dst)
  if dst.exists() and not dst.is_dir():
    raise ValueError(f"--dst={dst} exists and is not a folder; give a folder for the shards")
  if source and output_folder.overlaps(dst, source):
    raise ValueError(
        f"--dst={dst} is, holds or lies inside {source_flag}={source}; write the shards to a folder outside it"
    )
  if dst.is_dir():
    for p in sorted(dst.iterdir()):
      if not any(fnmatch.fnmatch(p.name, pattern) for pattern in own):
        raise ValueError(
            f"--dst={dst} holds {p.name!r}, which {tool} did not write; {tool} adds its shards only to a new or "
            "empty folder or to its own earlier output (to resume it), so give a new or empty --dst"
        )


def make(
    dst: str | os.PathLike,
    state_dir: str,
    own: Sequence[str],
    *,
    tool: str,
    source: str | os.PathLike | None = None,
    source_flag: str = "--src",
) -> Path:
  """`dst` (after `check`) with its hidden state folder `state_dir` (plan and per-shard stats) created; a problem
  raises ValueError naming it, before anything is written."""
  check(dst, own, tool=tool, source=source, source_flag=source_flag)
  dst = Path(dst)
  try:
    (dst / state_dir).mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a parent that is a file, a read-only or virtual file system
    raise ValueError(f"--dst={dst} cannot be created ({e.strerror}: {e.filename}); give a writable folder") from None
  return dst
