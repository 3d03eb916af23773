"""The output folder of a resumable shard writer (`data.prepare`, the feature cache).

Such a writer adds its shards to the folder and resumes its own earlier output there, so `--dst` must be new, empty
or hold only that writer's files (its hidden state folder, its shards, the temporaries a kill left): anything else —
a training workdir, another tool's shards, the images being read — would be mixed with the shards. Nor may it be,
hold or lie inside the input the shards are made from.

Each writer's layout (:data:`PREPARE`, :data:`CACHE`) is described here once, for the writer and for the readers of
its folders: a shard is finished when its stats file is in the state folder (:func:`finished`), and a folder whose
plan names shards that are not all finished is the output of a run that was stopped (:func:`unfinished`), which
training must not read as if it were the whole dataset.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Sequence

from iomm_jax import output_folder

PLAN_FILE = "plan.json"  # in the state folder: what the run writes, its shard count among it


@dataclasses.dataclass(frozen=True)
class Writer:
  """The layout of a resumable shard writer's folder: ``STATE_DIR/plan.json`` (with ``shards``, and for a writer
  with one shard set per process, ``process_count``), the shards (``shard_pattern``) and, per finished shard,
  ``STATE_DIR/<shard>.json`` (its stats, with ``written``: its record count), committed before the shard."""

  tool: str  # for messages: 'prepare', 'the feature cache'
  command: str  # the command that writes such a folder, and by a rerun finishes it
  state_dir: str
  shard_pattern: str  # str.format(shard, shards), or (process, process_count, shard, shards) when per_process
  per_process: bool = False
  keeps_empty_shards: bool = True  # else a finished shard that holds no record has stats but no file (the cache)

  @property
  def own_files(self) -> tuple[str, ...]:
    """The glob patterns of what the writer keeps in its folder (all that a --dst it resumes may hold): its state
    folder, its shards and their hidden temporaries (`output_folder.atomic_file(..., keep_suffix=False)`:
    ``.NAME.tmp-*``)."""
    shard_glob = self.shard_pattern.replace("{:05d}", "*")
    return (self.state_dir, shard_glob, f".{shard_glob}.tmp-*")

  def shard_name(self, shard: int, shards: int, process: int = 0, process_count: int = 1) -> str:
    args = (process, process_count, shard, shards) if self.per_process else (shard, shards)
    return self.shard_pattern.format(*args)

  def planned(self, folder: str | os.PathLike) -> list[str]:
    """The shards `folder`'s run writes: by its plan, or, without a readable one (a run that predates plans), by the
    counts the names of the shards there carry (``-of-N``)."""
    folder = Path(folder)
    try:
      plan = json.loads((folder / self.state_dir / PLAN_FILE).read_text())
      layouts = {(int(plan.get("process_count", 1)) if self.per_process else 1, int(plan["shards"]))}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
      fields = r"(\d+)".join(re.escape(part) for part in self.shard_pattern.split("{:05d}"))
      layouts = set()
      for p in folder.iterdir():
        m = re.fullmatch(fields, p.name)
        if m:
          layouts.add((int(m[2]), int(m[4])) if self.per_process else (1, int(m[2])))
    return sorted(
        {
            self.shard_name(s, shards, p, processes)
            for processes, shards in layouts
            for p in range(processes)
            for s in range(shards)
        }
    )


PREPARE = Writer(
    tool="prepare",
    command="python -m iomm_jax.data.prepare",
    state_dir=".prepare",
    shard_pattern="data-{:05d}-of-{:05d}.array_record",
)
CACHE = Writer(
    tool="the feature cache",
    command="python -m iomm_jax.cache",
    state_dir=".cache_state",
    shard_pattern="features-{:05d}-of-{:05d}-{:05d}-of-{:05d}.array_record",
    per_process=True,
    keeps_empty_shards=False,
)
WRITERS = (PREPARE, CACHE)


def finished(folder: str | os.PathLike, writer: Writer, name: str) -> bool:
  """Whether shard `name` of `writer` in `folder` is finished: its stats file is there, and the shard too (or, for a
  writer that keeps no empty shard, the stats say it holds no record). Reads no record, and stats only then."""
  folder = Path(folder)
  stats = folder / writer.state_dir / f"{name}.json"
  if not stats.is_file():
    return False
  if (folder / name).is_file():
    return True
  if writer.keeps_empty_shards:
    return False
  try:
    return int(json.loads(stats.read_text()).get("written", -1)) == 0
  except (OSError, ValueError, TypeError, AttributeError):
    return False


def unfinished(folder: str | os.PathLike) -> str:
  """'' unless `folder` holds a writer's state folder whose plan names shards that are not all finished (a run
  stopped by a full disk, a kill, Ctrl-C); then what a reader says of it: how many of how many shards are finished,
  and the rerun that finishes it. A folder of shards without such a state folder (another tool's) is ''."""
  folder = Path(folder)
  for writer in WRITERS:
    if not (folder / writer.state_dir).is_dir():
      continue
    names = writer.planned(folder)
    done = sum(finished(folder, writer, n) for n in names)
    if done < len(names):
      return (
          f"only {done} of the {len(names)} shards that {writer.tool} planned there are finished; rerun the same "
          f"`{writer.command}` command (--dst={folder}) to finish them (or let a run still writing them end), then train"
      )
  return ""


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
  (Writer.own_files). Checked before any work, and again by `make`."""
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
