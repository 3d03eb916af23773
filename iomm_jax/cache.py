"""Offline feature cache: frozen ViT+projector image tokens and autoencoder latents, written to ArrayRecord.

  python -m iomm_jax.cache --config=configs/X.py[:arg] [--config.k=v] --dst DIR [--shards N] [--dtype float16]

Builds the run (``train.builder.build``: mesh, frozen MLLM and autoencoder weights), reads the configured dataset
(``data.source``/``data.path``) once, in order — no shuffle, no repeat — and runs ``mllm.encode_image_tokens`` and
``ae.encode`` (posterior mean) under one jit, the batch sharded over every device of every process. Each process
handles a contiguous slice of the records and writes its own shard set

  DIR/features-PPPPP-of-NPROC-SSSSS-of-NSHARD.array_record

of ``records.encode_feature_record(id, vit_tokens (N, D), latent (h, w, C), caption_ids, caption)``. Sorted by name
the shards are the source order. Train on it with ``--config.data.cached=True --config.data.cache_path=DIR``; the
step then never runs the ViT or the autoencoder encoder (masking still happens per step on the cached tokens).

Storage dtype (``--dtype``): ``float16`` (default) halves the size of ``float32`` at ≈3 significant digits, ample
for conditioning tokens and normalised latents (FLUX VAE latents are O(1)); a value that overflows float16 (|x| >
65504) stops the run with the record's id — rerun with ``--dtype float32``. bfloat16 is not offered: the record
format stores numpy dtypes, which have no bfloat16. The training step casts latents to fp32 and tokens to the
compute dtype. Records are stored uncompressed (``group_size:1``: one random read per record; float features
barely compress).

Resumable and atomic: each shard is written under a hidden temporary name and renamed when complete, after its
stats file (``DIR/.cache_state/<shard>.json``); a rerun skips finished shards, and until one finishes them all,
training refuses DIR (``data.shard_dir.unfinished``). ``DIR/.cache_state/plan.json`` holds
what the cache was computed from (data, frozen model, dtype, shard layout); a rerun with anything different fails
rather than mixing caches, and a ``--dst`` holding anything else (a workdir, prepared image shards), or that is,
holds or lies inside ``config.data.path``, is refused before the build (``data.shard_dir``). Unreadable images are skipped and counted (nothing is written for them); caption-less
records are cached with ``caption=None`` (counted as ``uncaptioned``; pair recipes then skip or reject them).
The last stdout line is a JSON summary: ``written``, ``skipped``, ``uncaptioned``, shards, dtype, seconds.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from iomm_jax import app_exit, dtype_names, output_folder, write_failures
from iomm_jax import parallel
from iomm_jax.data import records
from iomm_jax.data import cache_reader, shard_dir
from iomm_jax.train import builder
from iomm_jax import distributed
from iomm_jax import config_cli
from iomm_jax.config import ConfigError, base_config
from iomm_jax.config_validation import unknown_field_message, validate

STATE_DIR = cache_reader.CACHE_STATE_DIR
PLAN_FILE = cache_reader.CACHE_PLAN_FILE
SHARD_PATTERN = shard_dir.CACHE.shard_pattern
WRITER_OPTIONS = "group_size:1,uncompressed"
STORED_DTYPES = ("float16", "float32")  # what the records can hold (dtype_names' names); bfloat16 is not numpy's
OWN_FILES = shard_dir.CACHE.own_files  # all a --dst it resumes may hold


def shard_name(process: int, process_count: int, shard: int, shards: int) -> str:
  return shard_dir.CACHE.shard_name(shard, shards, process, process_count)


def make_encoder(run) -> Any:
  """jit((frozen, vit_pixels, pixels) → (image tokens (B,N,D), latents (B,h,w,C))), batch sharded over the mesh.

  Exactly the live step's image path (``train.step.condition_inputs`` with ``cached=False``): the projected ViT
  tokens before masking, and the autoencoder posterior mean.
  """
  import jax
  from flax import nnx

  st = run.statics

  def encode(frozen, vit_pixels, pixels):
    mllm = nnx.merge(st.mllm_def, frozen["mllm"])
    ae = nnx.merge(st.ae_def, frozen["ae"])
    return mllm.encode_image_tokens(vit_pixels), ae.encode(pixels)

  mesh = run.mesh
  return jax.jit(
      encode,
      in_shardings=(run.frozen_shardings, parallel.batch_sharding(mesh, 4), parallel.batch_sharding(mesh, 4)),
      out_shardings=(parallel.batch_sharding(mesh, 3), parallel.batch_sharding(mesh, 4)),
  )


def local_rows(arr) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order (the inverse of ``parallel.global_batch``)."""
  shards = {}
  for s in arr.addressable_shards:
    start = s.index[0].start or 0
    shards.setdefault(start, s.data)  # replicas over the non-batch mesh axes hold the same rows
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def fingerprint(config, num_records: int, process_count: int, shards: int, dtype: str) -> dict:
  """What the cache content depends on; a rerun into the same --dst must match it."""
  d = config.data
  return {
      "format": "iomm_jax.cache/1",
      "num_records": int(num_records),
      "process_count": int(process_count),
      "shards": int(shards),
      "dtype": dtype,
      "data": {
          k: d[k]
          for k in (
              "source",
              "path",
              "num_images",
              "resolution",
              "vit_size",
              "max_text_tokens",
              "shapes_seed",
              "split",
              "image_key",
              "caption_key",
          )
      },
      "model": cache_reader.feature_model(config),
  }


def _check_dst(dst: Path, plan: dict, names: set[str]) -> None:
  plan_file = dst / STATE_DIR / PLAN_FILE
  old = json.loads(plan_file.read_text()) if plan_file.exists() else None
  present = sorted(p.name for p in dst.glob("*.array_record"))
  foreign = [n for n in present if n not in names]
  if foreign:
    raise ValueError(
        f"{dst} holds shards of another layout or dataset ({foreign[:3]}); use a new --dst or " "delete them"
    )
  if old is not None and old != plan and present:
    changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    raise ValueError(
        f"{dst} holds a feature cache computed from different settings (changed: {changed}); use "
        "a new --dst, or delete the old shards to recompute"
    )


def _write_shard(dst: Path, name: str, batches, encode, run, dtype: np.dtype, active: bool, progress=None) -> dict:
  """Encodes every batch; when ``active`` writes the readable rows to ``name`` (temp → rename) and its stats."""
  from array_record.python import array_record_module as ar

  stats = {"written": 0, "skipped": 0, "uncaptioned": 0, "errors": []}
  # hidden `.NAME.tmp-*` (never `*.array_record`, which readers glob): a rerun drops it; a failure removes it. An
  # inactive process, or a range with nothing readable, leaves no temporary file, so no (empty) shard file.
  with output_folder.atomic_file(dst / name, keep_suffix=False, skip_if_unwritten=True) as tmp:
    writer = ar.ArrayRecordWriter(str(tmp), WRITER_OPTIONS) if active else None
    for b in batches:
      g = parallel.global_batch({"vit_pixels": b["vit_pixels"], "pixels": b["pixels"]}, run.mesh)
      tokens, latents = encode(run.frozen, g["vit_pixels"], g["pixels"])
      if not active:
        continue
      tokens, latents = local_rows(tokens), local_rows(latents)
      for row in range(len(b["valid"])):
        if b["error"][row] == "":  # padding
          continue
        if not b["valid"][row]:
          stats["skipped"] += 1
          if len(stats["errors"]) < 10:
            stats["errors"].append(f"{b['id'][row]}: {b['error'][row]}")
          continue
        tok, lat = tokens[row].astype(dtype), latents[row].astype(dtype)
        if not (np.isfinite(tok).all() and np.isfinite(lat).all()):
          raise ValueError(
              f"record {b['id'][row]!r} (index {b['index'][row]}): features are not finite "
              f"in {np.dtype(dtype).name} (overflow or NaN in the frozen encoders); rerun "
              "with --dtype float32, and check the frozen weights if it persists"
          )
        caption = b["caption"][row]
        ids = None if caption is None else np.asarray(run.tokenize(caption), np.int32)
        stats["uncaptioned"] += caption is None
        record = records.encode_feature_record(
            id=b["id"][row], vit_tokens=tok, latent=lat, caption_ids=ids, caption=caption
        )
        with write_failures.writing(dst / name):
          writer.write(record)
        stats["written"] += 1
      if progress is not None:
        progress.update(int(sum(e != "" for e in b["error"])))
    if not active:
      return stats
    with write_failures.writing(dst / name):
      writer.close()
    with output_folder.atomic_file(dst / STATE_DIR / f"{name}.json", keep_suffix=False) as stats_tmp:
      stats_tmp.write_text(json.dumps(stats))
    # the stats block ended first: a finished shard always has stats; the shard is replaced on leaving
    if not stats["written"]:
      tmp.unlink()  # nothing readable in this range: no (empty) shard file
  return stats


def _all_processes(flag: bool) -> bool:
  import jax

  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def write_cache(
    config,
    dst: str | os.PathLike,
    *,
    shards: int = 1,
    dtype: str = "float16",
    batch: int | None = None,
    run=None,
    workdir: str | None = None,
    progress: bool = True,
) -> dict:
  """Computes and writes the feature cache of ``config``'s dataset into ``dst``; returns the summary dict.

  ``batch``: global images per encoder call (default ``config.train.global_batch``). ``run``: a built
  ``train.builder.Run`` to reuse (tests); by default one is built from ``config``.
  """
  import jax

  t0 = time.time()
  try:
    dtype = dtype_names.canonical(dtype, STORED_DTYPES, flag="--dtype")
  except ValueError as e:
    if dtype_names.SHORT.get(dtype, dtype) != "bfloat16":
      raise
    raise ValueError(f"{e}: bfloat16 cannot be stored, the record format keeps numpy dtypes") from None
  if shards <= 0:
    raise ValueError(f"--shards={shards} must be positive")
  # --dst: new, empty or this cache's own earlier output, outside the images it reads; checked before the build
  folder = dict(tool="the feature cache", source=config.data.path or None, source_flag="config.data.path")
  shard_dir.check(dst, OWN_FILES, **folder)
  spec = cache_reader.image_spec(config.data)
  if run is None:

    run = builder.build(config)
  batch = int(batch or config.train.global_batch)
  per_process = parallel.batch_size_per_process(batch, run.mesh)
  source = cache_reader.make_source(config.data, workdir)
  n, pid, nproc = len(source), jax.process_index(), jax.process_count()
  dst = shard_dir.make(dst, STATE_DIR, OWN_FILES, **folder)
  names = [shard_name(pid, nproc, s, shards) for s in range(shards)]
  all_names = {shard_name(p, nproc, s, shards) for p in range(nproc) for s in range(shards)}
  plan = fingerprint(config, n, nproc, shards, dtype)
  _check_dst(dst, plan, all_names)
  if pid == 0:
    with output_folder.atomic_file(dst / STATE_DIR / PLAN_FILE, keep_suffix=False) as tmp_plan:
      tmp_plan.write_text(json.dumps(plan, sort_keys=True, indent=1))
  for nm in names:  # leftovers of a killed run of this process: hidden, never read, safe to drop
    for stale in dst.glob(f".{nm}.tmp-*"):
      stale.unlink(missing_ok=True)

  encode = make_encoder(run)
  rows_per_shard = cache_reader.max_shard_len(n, nproc, shards)
  num_batches = math.ceil(rows_per_shard / per_process)
  plo, phi = cache_reader.split_range(0, n, nproc, pid)
  threads, workers = spec.num_threads, spec.num_workers
  bar = None
  if progress and pid == 0:
    from tqdm import tqdm

    bar = tqdm(total=phi - plo, unit="img", desc=f"cache -> {dst}", file=sys.stderr, dynamic_ncols=True)
  done_before = written_now = 0
  for s, name in enumerate(names):
    mine_done = shard_dir.finished(dst, shard_dir.CACHE, name)
    if _all_processes(mine_done):  # every process must run the same encoder calls (collectives)
      done_before += 1
      if bar is not None:
        lo, hi = cache_reader.split_range(plo, phi, shards, s)
        bar.update(hi - lo)
      continue
    lo, hi = cache_reader.split_range(plo, phi, shards, s)
    if mine_done:  # others still work on shard s: keep in step with padding-only batches
      lo = hi
    batches = cache_reader.iter_batches(
        source, spec, lo, hi, per_process, num_batches, threads=threads, workers=workers
    )
    _write_shard(dst, name, batches, encode, run, dtype_names.numpy_dtype(dtype), active=not mine_done, progress=bar)
    written_now += not mine_done
  if bar is not None:
    bar.close()
  if nproc > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("iomm_jax.cache done")
  summary = {"written": 0, "skipped": 0, "uncaptioned": 0}
  errors = []
  for nm in sorted(all_names):  # every process's stats (shared filesystem) or this one's only
    f = dst / STATE_DIR / f"{nm}.json"
    if f.exists():
      st = json.loads(f.read_text())
      for k in summary:
        summary[k] += int(st.get(k, 0))
      errors += st.get("errors", [])
  summary.update(
      records=n,
      shards=shards,
      processes=nproc,
      shards_written=written_now,
      shards_already_done=done_before,
      dtype=dtype,
      vit_tokens_shape=[run.mcfg.num_image_tokens, int(run.mcfg.text.hidden_size)],
      latent_shape=list(run.latent_shape),
      dst=str(dst),
      first_errors=errors[:5],
      seconds=round(time.time() - t0, 2),
  )
  return summary


def main(argv) -> int:
  from absl import app, flags
  from ml_collections import config_flags  # noqa: F401  (the --config flag is defined at import below)

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value> to override fields")
  if not flags.FLAGS.dst:  # a usage error, as argparse's: one line, exit status 2 (absl's `required` said "config")
    print(
        "cache: error: --dst is required; give the folder to write the feature shards to (--dst DIR)", file=sys.stderr
    )
    return 2
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  config = flags.FLAGS.config

  try:
    distributed.initialize_from_config(config)  # every process joins before touching devices
    validate(config)
    summary = write_cache(
        config,
        flags.FLAGS.dst,
        shards=flags.FLAGS.shards,
        dtype=flags.FLAGS.dtype,
        batch=flags.FLAGS.batch or None,
        progress=not flags.FLAGS.no_progress,
    )
  except (ConfigError, ValueError, distributed.DistributedStartError) as e:
    print(f"cache: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a full disk, a folder that cannot be written: finished shards stay, and a rerun resumes
    print(
        f"cache: error: {app_exit.describe(e)}; the shards finished so far are kept: fix the cause (free space in "
        f"--dst={flags.FLAGS.dst}) and rerun the same command to resume",
        file=sys.stderr,
    )
    return 1
  import jax

  if jax.process_index() == 0:
    print(json.dumps(summary), flush=True)
  return 0


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=True)
  flags.DEFINE_string("dst", None, "output folder for the feature shards (required)")
  flags.DEFINE_integer("shards", 1, "shards per process")
  flags.DEFINE_string("dtype", "float16", "storage dtype of ViT tokens and latents: float16 or float32 (fp16, fp32)")
  flags.DEFINE_integer("batch", 0, "global images per encoder call (0 = config.train.global_batch)")
  flags.DEFINE_bool("no_progress", False, "no progress bar")
  return config


if __name__ == "__main__":
  from absl import app

  parser = config_cli.flags_parser(
      _define_flags(), unknown_field=unknown_field_message, sections=tuple(base_config().keys())
  )
  sys.exit(app.run(lambda argv: app_exit.run(main, argv), flags_parser=parser))
