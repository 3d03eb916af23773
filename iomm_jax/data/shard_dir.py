"""The output folder of a resumable shard writer (`data.prepare`, the feature cache)."""

from __future__ import annotations

import os
from pathlib import Path


def make(dst: str | os.PathLike, state_dir: str) -> Path:
  """`dst` with its hidden state folder `state_dir` (plan and per-shard stats) created; a `dst` that is a file
  raises ValueError naming it, before anything is written."""
  dst = Path(dst)
  if dst.exists() and not dst.is_dir():
    raise ValueError(f"--dst={dst} exists and is not a folder; give a folder for the shards")
  try:
    (dst / state_dir).mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a parent that is a file, a read-only or virtual file system
    raise ValueError(f"--dst={dst} cannot be created ({e.strerror}: {e.filename}); give a writable folder") from None
  return dst
