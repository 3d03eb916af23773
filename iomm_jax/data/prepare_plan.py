"""What a prepared shard folder holds besides its shards, and whether a new prepare run may write into it.

  DIR/data-00000-of-000NN.array_record      the shards (SHARD_PATTERN)
  DIR/.prepare/plan.json                    the run's plan: item count, shard count, --min_size, a hash of the item
                                            keys and the options that decide what a record holds (PLAN_FLAGS)
  DIR/.prepare/<shard>.json                 that shard's counts (written, skipped ...)
  DIR/.prepare/<shard>.sizes.npy            (height, width) of each record, for aspect-ratio buckets

A run whose plan equals the folder's resumes it (finished shards are skipped); one with other options is refused
naming each option's earlier and new value, unless the shards there hold no record, which are then replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from iomm_jax import output_folder
from iomm_jax.data import prepare_items, shard_dir

SHARD_PATTERN = shard_dir.PREPARE.shard_pattern
STATE_DIR = shard_dir.PREPARE.state_dir  # plan + per-shard stats; hidden so shard globs never see it
SIZES_SUFFIX = ".sizes.npy"  # per-shard sidecar in STATE_DIR: int32 (n, 2) = (height, width) per record
PLAN_FILE = shard_dir.PLAN_FILE
# Fingerprint field → the flag that sets it, for the refusal message: what decides which records a shard holds, so a
# resumed run with another value would mix two datasets in one folder.
PLAN_FLAGS = {k: "--" + k for k in ("src", "image_key", "caption_key", "split", "max_image_pixels")}


def sizes_path(shard: str | os.PathLike) -> Path:
  """The sizes sidecar of an ArrayRecord shard: ``<shard dir>/.prepare/<shard name>.sizes.npy``."""
  shard = Path(shard)
  return shard.parent / STATE_DIR / (shard.name + SIZES_SUFFIX)


def plan_of(items: Sequence[prepare_items.Item], shards: int, min_size: int, fingerprint: dict | None) -> dict:
  """The plan of a run writing `items` into `shards` shards (`fingerprint`: PLAN_FLAGS fields → their values)."""
  h = hashlib.sha1()
  for it in items:
    h.update(it.key.encode("utf-8") + b"\0")
  return {
      "num_items": len(items),
      "shards": shards,
      "min_size": min_size,
      "keys_sha1": h.hexdigest(),
      "fingerprint": fingerprint or {},
  }


def option_changes(old: dict, new: dict) -> list[str]:
  """How the plan of an earlier run in the same folder differs from this one, in the flags that set it ('--min_size
  was 64, now 32'); only fields both plans have are compared (older plans lack some)."""
  changes = []
  for k in sorted(set(old.get("fingerprint", {})) & set(new.get("fingerprint", {}))):
    a, b = old["fingerprint"][k], new["fingerprint"][k]
    if a != b:
      changes.append(f"{PLAN_FLAGS.get(k, 'the ' + k)} was {json.dumps(a)}, now {json.dumps(b)}")
  for k in ("shards", "min_size"):
    if k in old and old[k] != new[k]:
      changes.append(f"--{k} was {old[k]}, now {new[k]}")
  if not changes and (old.get("num_items"), old.get("keys_sha1")) != (new["num_items"], new["keys_sha1"]):
    changes.append(f"the input's images changed ({old.get('num_items')} before, {new['num_items']} now)")
  return changes


def adopt(dst: Path, plan: dict, names: Sequence[str]) -> Path:
  """Makes `plan` the plan of the folder `dst`, which this run fills with the shards `names`; returns the plan file.

  Shards of an earlier run with other options (or named otherwise) are removed when they hold no record, and stop
  the run (ValueError, one line naming the options that differ) when they hold some: nothing written is replaced."""
  plan_file = dst / STATE_DIR / PLAN_FILE
  existing = sorted(p.name for p in dst.glob("*.array_record"))
  try:
    old = json.loads(plan_file.read_text()) if plan_file.exists() else None
  except ValueError:  # a plan cut short by a kill: the shard names and stats files still say what lies there
    old = None
  changes = option_changes(old, plan) if old is not None else []
  if existing and (changes or any(n not in names for n in existing)):
    if all(holds_no_record(dst, n) for n in existing):  # an earlier run that wrote no record: nothing to keep
      remove_shards(dst, existing)
    elif changes:
      raise ValueError(
          f"--dst={dst} already holds shards of a prepare run with other options ({'; '.join(changes)}); rerun with "
          f"the earlier options to finish or reuse them, or give a new --dst (or delete {dst}'s data-*.array_record "
          f"and {STATE_DIR}/ to start over)"
      )
    else:
      foreign = [n for n in existing if n not in names]
      raise ValueError(
          f"--dst={dst} holds shards this run does not write ({', '.join(foreign[:3])}"
          f"{', …' if len(foreign) > 3 else ''}), not described by its {STATE_DIR}/{PLAN_FILE}; give a new --dst or "
          "move those shards away"
      )
  with output_folder.atomic_file(plan_file, keep_suffix=False) as plan_tmp:  # a kill never leaves half a plan
    plan_tmp.write_text(json.dumps(plan, sort_keys=True))
  return plan_file


def holds_no_record(dst: Path, name: str) -> bool:
  """Whether shard `name` in `dst` is prepare's own (it has a stats file) and its stats say it holds no record."""
  try:
    return int(json.loads((dst / STATE_DIR / f"{name}.json").read_text()).get("written", -1)) == 0
  except (OSError, ValueError, AttributeError):
    return False


def remove_shards(dst: Path, names: Sequence[str]) -> None:
  """Deletes prepare's own shards `names` (each holding no record) with their stats and sizes sidecars."""
  for name in names:
    for p in (sizes_path(dst / name), dst / STATE_DIR / f"{name}.json", dst / name):
      p.unlink(missing_ok=True)


def remove_if_empty(*folders: Path) -> None:
  """Removes each of `folders` that is empty; never anything that lies in one."""
  for folder in folders:
    try:
      folder.rmdir()
    except OSError:
      pass
