"""Ingest an image corpus into ArrayRecord shards: ``python -m iomm_jax.data.prepare --src PATH --dst DIR --shards N``.

Sources (``--src``): a folder of images (recursive; captions from sidecar ``.txt`` or ``captions.jsonl``), a
``.jsonl``/``.csv``/``.tsv``/``.parquet`` table of (image path, caption) (``--image_key``/``--caption_key``;
relative paths are relative to the table; a folder or glob of tables is read as one dataset, as Hugging Face stores
its Parquet shards), webdataset-style uncompressed ``.tar`` shards (a file, a glob or a folder
of them; ``KEY.jpg|png|webp`` + ``KEY.txt``, the img2dataset layout) or a TFDS builder directory (``--split``).

Output: ``DIR/data-00000-of-000NN.array_record`` holding ``records.encode_image_record`` records (encoded bytes
unchanged, caption, width, height, id = sha1 of the source path/key). Items are sorted by key and cut into N
contiguous blocks, so the assignment is deterministic. Each shard is written under a hidden temporary name and
renamed when complete (the pipeline only reads ``*.array_record``), so an interrupted run leaves nothing half
written that would be read, and a rerun skips finished shards; until a rerun finishes them all, training refuses
the folder (``shard_dir.unfinished``) rather than read part of the dataset. Each image is fully decoded by the training path
(``decode.open_image``: a truncated JPEG is caught; ``--fast_verify`` checks the structure with PIL's ``verify`` only,
about 5× faster on 512² JPEGs (bench/prepare.py) but blind to some truncations); unreadable ones, those with more
than ``--max_image_pixels`` pixels and those with a short side under ``--min_size`` are skipped and counted.
Width and height are recorded as displayed (EXIF orientation applied). A Parquet table's image column may hold
paths, encoded bytes or ``{bytes, path}`` structs (HF datasets). The last stdout line is a JSON summary; a run that
writes no record exits 1 with the reason (the summary's ``written_with_caption`` says how many written records carry
a caption: 0 means the caption column is not ``--caption_key``) and leaves nothing in DIR (nor DIR, if it made it), so the corrected rerun
starts afresh. A write that fails (a full disk) stops the run with one line; finished shards stay and a rerun
resumes. DIR holding shards of a run with other options (``--src``, ``--shards``, ``--min_size``, the keys read,
``--max_image_pixels``) is refused, the message naming each option's earlier and new value; such shards that hold
no record are replaced (``prepare_plan``). A DIR holding anything but prepare's own files, or that is, holds or lies
inside ``--src``, is refused before ``--src`` is read (``shard_dir``): the shards are never mixed into another folder.

Each shard also gets a sizes sidecar, ``DIR/.prepare/<shard>.sizes.npy`` (int32 (n, 2): height, width of each record,
in record order), written before the shard is renamed into place, so aspect-ratio buckets (``data.buckets``) need
not read every record at start. A rerun adds the sidecar to finished shards written before sidecars existed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from iomm_jax import app_exit
from iomm_jax import config as config_lib
from iomm_jax import data_kinds, output_folder, write_failures
from iomm_jax.data import decode, prepare_items, records, shard_dir
from iomm_jax.data.prepare_plan import SHARD_PATTERN, STATE_DIR, sizes_path
from iomm_jax.data import prepare_plan

WRITER_OPTIONS = "group_size:1,uncompressed"  # group_size 1 for random access; images are already compressed
OWN_FILES = shard_dir.PREPARE.own_files  # all a --dst it resumes may hold


def _write_sizes(shard: Path, sizes) -> None:
  """Writes the sidecar atomically (temp name → rename), so a half-written one is never read."""
  with output_folder.atomic_file(sizes_path(shard), keep_suffix=False) as tmp:
    with open(tmp, "wb") as f:  # a file object: np.save would append '.npy' to a path
      np.save(f, np.asarray(sizes, np.int32).reshape(-1, 2))


def backfill_sizes(shard: str | os.PathLike) -> int:
  """Writes the sizes sidecar of a finished shard from its records (which carry width/height); returns the count."""
  from array_record.python import array_record_module as ar

  reader = ar.ArrayRecordReader(str(shard))
  try:
    sizes, n = [], reader.num_records()
    for lo in range(0, n, 256):  # in chunks: a shard of images need not fit in memory
      for data in reader.read(lo, min(n, lo + 256)):
        rec = records.decode_record(data)
        sizes.append((int(rec.get("height") or 0), int(rec.get("width") or 0)))
  finally:
    reader.close()
  _write_sizes(Path(shard), sizes)
  return len(sizes)


# ------------------------------------------------------------------------------------------------------ writing
def probe_image(
    data: bytes, full_decode: bool = True, max_pixels: int = data_kinds.MAX_IMAGE_PIXELS
) -> tuple[int, int]:
  """(width, height) as displayed (EXIF orientation applied) of encoded image bytes; raises
  ``decode.UnreadableImage`` on empty/corrupt data (``decode.ImageTooLarge`` past ``max_pixels``). ``full_decode``
  decodes it as training will; else PIL's ``verify`` (structure and CRCs: catches truncated PNGs, not all JPEGs)."""
  if full_decode:
    return decode.open_image(data, max_pixels=max_pixels).size
  if not data:
    raise decode.UnreadableImage("zero-byte image")
  try:
    w, h = decode.header_size(data)
    decode.check_pixels(w, h, max_pixels)
    with Image.open(io.BytesIO(data)) as im:
      im.verify()
  except decode.UnreadableImage:
    raise
  except Exception as e:
    raise decode.UnreadableImage(f"{type(e).__name__}: {e}") from e
  return w, h


def record_id(key: str) -> str:
  """The stable id of an item: sha1 of its source path/key."""
  return hashlib.sha1(key.encode("utf-8")).hexdigest()


_counter = None  # progress counter: a shared multiprocessing.Value in pool workers, _LocalCounter in-process


class _LocalCounter:

  def __init__(self):
    self.value = 0
    self._lock = threading.Lock()

  def get_lock(self):
    return self._lock


def _init_worker(counter) -> None:
  global _counter
  _counter = counter


def _tick() -> None:
  if _counter is not None:
    with _counter.get_lock():
      _counter.value += 1


_STATS = ("written", "skipped_unreadable", "skipped_too_large", "skipped_too_small")  # each image counted once
_CAPTIONED = "written_with_caption"  # of the written: how many carry a caption (0 says the caption column is wrong)
_MAX_ERRORS = 5  # first errors kept per shard, for the summary


def write_shard(
    dst: str,
    name: str,
    items: Sequence[prepare_items.Item],
    min_size: int,
    full_decode: bool,
    max_pixels: int = data_kinds.MAX_IMAGE_PIXELS,
) -> dict:
  """Writes one shard (temp name → rename) and its stats file; returns the stats."""
  from array_record.python import array_record_module as ar

  final, state = Path(dst) / name, Path(dst) / STATE_DIR
  stats = {**dict.fromkeys(_STATS + (_CAPTIONED,), 0), "errors": []}
  sizes = []  # (height, width) of each written record, for the sizes sidecar
  with write_failures.writing(final):
    # hidden `.NAME.tmp-*` (never `*.array_record`, which readers glob): a rerun drops it; a failure removes it
    with output_folder.atomic_file(final, keep_suffix=False) as tmp:
      writer = ar.ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
      for item in items:
        try:
          data, caption = item.loader()
          w, h = probe_image(data, full_decode, max_pixels)
        except Exception as e:  # unreadable or too large: counted, never fatal
          stats["skipped_too_large" if isinstance(e, decode.ImageTooLarge) else "skipped_unreadable"] += 1
          if len(stats["errors"]) < _MAX_ERRORS:
            stats["errors"].append(f"{item.key}: {type(e).__name__}: {e}")
          _tick()
          continue
        if min(w, h) < min_size:
          stats["skipped_too_small"] += 1
        else:
          writer.write(
              records.encode_image_record(image_bytes=data, caption=caption, width=w, height=h, id=record_id(item.key))
          )
          sizes.append((h, w))
          stats["written"] += 1
          stats[_CAPTIONED] += caption is not None
        _tick()
      writer.close()
      _write_sizes(final, sizes)  # sidecar, then stats, then the shard: a finished shard has both
      with output_folder.atomic_file(state / f"{name}.json", keep_suffix=False) as stats_tmp:
        stats_tmp.write_text(json.dumps(stats))
      # the stats block ended first: a finished shard always has its stats; the shard is replaced on leaving
  return stats


MIN_SIZE = 64  # --min_size's default: shards for training at 256² and up need no thumbnails


def write_shards(
    items: Sequence[prepare_items.Item],
    dst: str | os.PathLike,
    shards: int,
    *,
    workers: int = 0,
    min_size: int = MIN_SIZE,
    full_decode: bool = True,
    fingerprint: dict | None = None,
    progress: bool = True,
    max_pixels: int = data_kinds.MAX_IMAGE_PIXELS,
    src: str | os.PathLike | None = None,
) -> dict:
  """Writes ``items`` into ``shards`` ArrayRecord shards under ``dst`` (resumable); returns the summary dict.

  ``dst`` must be new, empty or this writer's own earlier output, and outside ``src`` (the --src the items come from;
  ``shard_dir.check``).

  ``workers`` <= 1 writes in this process; more uses that many spawned processes, one shard per task. A run whose
  shards hold no record at all leaves nothing behind (``dst`` too, if this run made it; the summary says
  ``"removed_empty": true``), so a corrected rerun starts afresh; shards of an earlier run with other options that hold
  no record are replaced the same way. Shards that hold records of another plan stop the run naming the options that
  differ.
  """
  if shards <= 0:
    raise ValueError(f"--shards={shards} must be positive")
  if not items:
    raise ValueError("nothing to write: the source holds no items")
  made_dst = not Path(dst).exists()
  dst = shard_dir.make(dst, STATE_DIR, OWN_FILES, tool="prepare", source=src)
  names = [SHARD_PATTERN.format(s, shards) for s in range(shards)]
  plan_file = prepare_plan.adopt(dst, prepare_plan.plan_of(items, shards, min_size, fingerprint), names)
  for stale in dst.glob(".data-*.tmp-*"):  # leftovers of an interrupted run: never read, safe to drop
    stale.unlink(missing_ok=True)

  bounds = [len(items) * s // shards for s in range(shards + 1)]
  todo, summary = [], {**dict.fromkeys(_STATS + (_CAPTIONED,), 0), "first_errors": []}
  done = 0
  for s, name in enumerate(names):
    if shard_dir.finished(dst, shard_dir.PREPARE, name):
      _add_stats(summary, json.loads((dst / STATE_DIR / f"{name}.json").read_text()))
      done += 1
      if not sizes_path(dst / name).exists():  # finished by a prepare from before sizes sidecars
        backfill_sizes(dst / name)
    else:
      todo.append((name, items[bounds[s] : bounds[s + 1]]))
  total = sum(len(t[1]) for t in todo)

  from tqdm import tqdm

  bar = tqdm(total=total, unit="img", desc=f"prepare -> {dst}", disable=not progress, file=sys.stderr)
  in_process = workers <= 1 or len(todo) <= 1
  ctx = mp.get_context("spawn")  # never fork a process that may hold JAX or threads
  counter = _LocalCounter() if in_process else ctx.Value("q", 0)
  stop = threading.Event()

  def poll():
    while not stop.wait(0.2):
      bar.update(counter.value - bar.n)

  poller = threading.Thread(target=poll, daemon=True)
  poller.start()
  try:
    if in_process:
      _init_worker(counter)
      results = [write_shard(str(dst), name, chunk, min_size, full_decode, max_pixels) for name, chunk in todo]
    else:
      with concurrent.futures.ProcessPoolExecutor(
          min(workers, len(todo)), mp_context=ctx, initializer=_init_worker, initargs=(counter,)
      ) as pool:
        futs = [
            pool.submit(write_shard, str(dst), name, chunk, min_size, full_decode, max_pixels) for name, chunk in todo
        ]
        results = [f.result() for f in futs]
  finally:
    stop.set()
    poller.join()
    _init_worker(None)
  bar.update(total - bar.n)
  bar.close()
  for r in results:
    _add_stats(summary, r)
  summary.update(shards=shards, shards_written=len(todo), shards_already_done=done, dst=str(dst))
  if not summary["written"]:  # no usable output: leave nothing that a corrected rerun would have to clear
    prepare_plan.remove_shards(dst, names)
    plan_file.unlink(missing_ok=True)
    prepare_plan.remove_if_empty(dst / STATE_DIR, *([dst] if made_dst else []))
    summary["removed_empty"] = True
  return summary


def _add_stats(summary: dict, stats: dict) -> None:
  """Adds one shard's stats into the summary (stats files of older runs lack some keys)."""
  for k in _STATS + (_CAPTIONED,):
    summary[k] += int(stats.get(k, 0))
  summary["first_errors"] = (summary["first_errors"] + list(stats.get("errors", [])))[:_MAX_ERRORS]


def nothing_written(summary: dict) -> str:
  """The one-line reason a run wrote no record ('' when it wrote some)."""
  if summary["written"]:
    return ""
  skipped = ", ".join(f"{summary[k]} {k[8:].replace('_', ' ')}" for k in _STATS[1:] if summary[k])
  first = f"; first: {summary['first_errors'][0]}" if summary["first_errors"] else ""
  kept = "; nothing was kept in --dst, so a corrected rerun starts afresh" if summary.get("removed_empty") else ""
  return (
      f"wrote 0 of {sum(summary[k] for k in _STATS)} images ({skipped or 'none readable'}){first}; check "
      f"--src, --image_key, --min_size and --max_image_pixels{kept}"
  )


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m iomm_jax.data.prepare", description=__doc__.split("\n\n")[0])
  ap.add_argument(
      "--src",
      required=True,
      help="folder of images, .jsonl/.csv/.tsv/.parquet table (or a folder / glob of tables), .tar / glob / folder "
      "of .tar, or TFDS builder dir",
  )
  ap.add_argument("--dst", required=True, help="output folder for data-*.array_record shards")
  ap.add_argument("--shards", type=int, required=True, help="number of shards")
  ap.add_argument(
      "--min_size", type=int, default=MIN_SIZE, help="skip images whose short side is smaller; as data.min_image_side"
  )
  ap.add_argument("--workers", type=int, default=0, help="writer processes (0/1 = this process)")
  data = config_lib.base_config().data  # the same defaults as training's data.image_key / caption_key / split
  ap.add_argument("--image_key", default=data.image_key, help="image column/field of a table or TFDS feature")
  ap.add_argument("--caption_key", default=data.caption_key, help="caption column/field ('' for none)")
  ap.add_argument("--split", default=data.split, help="TFDS split")
  ap.add_argument(
      "--fast_verify",
      action="store_true",
      help="check images with PIL's verify() instead of a full decode (faster; misses some truncated "
      "JPEGs, which training then skips)",
  )
  ap.add_argument("--full_decode", action="store_true", help=argparse.SUPPRESS)  # the default now; old scripts
  ap.add_argument(
      "--max_image_pixels",
      type=int,
      default=data_kinds.MAX_IMAGE_PIXELS,
      help="skip (and count) images with more pixels than this, undecoded (0 = no limit); as " "data.max_image_pixels",
  )
  ap.add_argument("--no_progress", action="store_true", help="no progress bar")
  a = ap.parse_args(argv)
  for flag in ("min_size", "workers", "max_image_pixels"):
    if getattr(a, flag) < 0:
      ap.error(f"--{flag}={getattr(a, flag)} must be 0 or more")
  t0 = time.time()
  try:
    shard_dir.check(a.dst, OWN_FILES, tool="prepare", source=a.src)  # before reading a large --src
    items = prepare_items.enumerate_items(a.src, a.image_key, a.caption_key or None, a.split)
    summary = write_shards(
        items,
        a.dst,
        a.shards,
        workers=a.workers,
        min_size=a.min_size,
        full_decode=not a.fast_verify,
        progress=not a.no_progress,
        max_pixels=a.max_image_pixels,
        src=a.src,
        fingerprint={
            "src": os.path.abspath(os.path.expanduser(a.src)),
            **{k: getattr(a, k) for k in prepare_plan.PLAN_FLAGS if k != "src"},
        },
    )
  except ValueError as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a full disk, a folder that cannot be written: finished shards stay, and a rerun resumes
    print(
        f"prepare: error: {app_exit.describe(e)}; the shards finished so far are kept: fix the cause (free space in --dst={a.dst}) "
        "and rerun the same command to resume",
        file=sys.stderr,
    )
    return 1
  summary["seconds"] = round(time.time() - t0, 2)
  print(json.dumps(summary), flush=True)
  reason = nothing_written(summary)
  if reason:
    print(f"prepare: error: {reason}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(app_exit.run(main))
