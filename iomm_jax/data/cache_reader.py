"""One ordered pass over the configured dataset, for the feature cache (``iomm_jax.cache``).

Unlike the training pipeline (``pipeline.make_dataset``: shuffle, repeat, substitute unreadable records), the
cache must see every record exactly once and in source order, and must *report* an unreadable record instead of
replacing it with its neighbour (a substitute would be cached twice). So this module:

* splits the source into contiguous per-process ranges, and each range into contiguous shard ranges
  (:func:`split_range`), so the shard files sorted by name are the source order;
* decodes with the training pipeline's own preprocessing (``pipeline.LoadExample._payload``: short-side resize,
  centre crop, the autoencoder view and the ViT view), so cached features are those the live step would compute;
* yields fixed-size batches (:func:`iter_batches`), the last one padded, with a ``valid`` row mask.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import grain
import numpy as np

from iomm_jax.data import data_config, pipeline, shard_dir, sources
from iomm_jax.data.data_config import DataConfig

CACHE_STATE_DIR = shard_dir.CACHE.state_dir  # beside the feature shards: the plan (what they were computed from), stats
CACHE_PLAN_FILE = shard_dir.PLAN_FILE
# What cached features depend on besides the records: the frozen models that computed them and the views they saw.
FEATURE_DATA_FIELDS = ("resolution", "vit_size", "max_text_tokens")


def feature_model(config) -> dict:
  """The frozen models a feature cache was computed with: random ones (no path) depend on the seed, loaded ones on
  the path. Stored in the cache's plan; a run training from the cache must have the same."""
  m = config.model
  return {
      "mllm_path": m.mllm.path,
      "mllm_arch": json.loads(m.mllm.arch.to_json_best_effort()),
      "autoencoder": json.loads(m.autoencoder.to_json_best_effort()),
      "frozen_dtype": m.frozen_dtype,
      # The seed matters only where a frozen model is random: no MLLM path, or a FLUX VAE without one (the
      # identity autoencoder has no weights).
      "seed": None if (m.mllm.path and (m.autoencoder.path or m.autoencoder.kind != "flux_vae")) else config.seed,
  }


def cache_mismatches(config, cache_path: str) -> list[str]:
  """'field: cache value, run value' for each setting the cache at `cache_path` was computed with that `config`
  differs in (features of another MLLM or autoencoder would train silently); [] when it matches or has no plan."""
  plan_file = Path(cache_path) / CACHE_STATE_DIR / CACHE_PLAN_FILE
  if not plan_file.is_file():
    return []
  plan = json.loads(plan_file.read_text())
  out = []
  for key, want in feature_model(config).items():
    got = plan.get("model", {}).get(key, want)
    if key == "seed" and want is None:  # this run's frozen models are all loaded: a cache's seed cannot matter
      continue
    if got != want:
      out.append(f"model {key}: cache {got!r}, this run {want!r}")
  for key in FEATURE_DATA_FIELDS:
    got, want = plan.get("data", {}).get(key, config.data[key]), config.data[key]
    if got != want:
      out.append(f"data.{key}: cache {got!r}, this run {want!r}")
  return out


def split_range(lo: int, hi: int, parts: int, part: int) -> tuple[int, int]:
  """The ``part``-th of ``parts`` contiguous, near-equal pieces of ``[lo, hi)`` (sizes differ by at most one)."""
  if parts <= 0 or not 0 <= part < parts:
    raise ValueError(f"part {part} of {parts}: need 0 <= part < parts")
  n = hi - lo
  return lo + n * part // parts, lo + n * (part + 1) // parts


def max_shard_len(n: int, process_count: int, shards: int) -> int:
  """The largest shard range over all processes (every process runs this many rows per shard, for lock-step)."""
  best = 0
  for p in range(process_count):
    plo, phi = split_range(0, n, process_count, p)
    for s in range(shards):
      lo, hi = split_range(plo, phi, shards, s)
      best = max(best, hi - lo)
  return best


def image_spec(data_cfg: Any) -> DataConfig:
  """``data_cfg`` (``config.data`` or a DataConfig) as the cache reads it: data.source/data.path as images, one
  pass, recipe 'image' (captions are stored when present, never required)."""
  d = data_config.from_config(data_cfg)
  if d.cached:
    raise ValueError(
        "the feature cache reads images, but data.cached=True; drop --config.data.cached (the "
        "cache is built from data.source/data.path and read back with data.cached=True)"
    )
  return dataclasses.replace(
      d,
      recipe="image",
      mix_lambda=0.0,
      skip_uncaptioned=True,
      image_source="",
      image_path="",
      image_cache_path="",
      buckets=(),
  )


class LoadForCache:
  """Map function: source index → dict with both views, caption, id, and ``ok``/``error`` (never substitutes)."""

  def __init__(self, source: Any, spec: DataConfig):
    self.load = pipeline.LoadExample(source, spec)  # its _payload is the live path's decode + views

  def __call__(self, idx: int) -> dict:
    idx = int(idx)
    rid = f"#{idx}"
    try:
      rec = self.load.source[idx]
      rid = str(rec.get("id", rid))
      out = self.load._payload(rec)
    except pipeline.DataConfigError:
      raise
    except Exception as e:  # unreadable / corrupt / truncated: reported, counted, not written
      return {"ok": False, "index": idx, "id": rid, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "index": idx, "id": rid, "caption": rec.get("caption"), **out}


def iter_batches(
    source: Any, spec: DataConfig, lo: int, hi: int, batch: int, num_batches: int, *, threads: int = 2, workers: int = 0
) -> Iterator[dict]:
  """``num_batches`` batches of ``batch`` rows covering source records ``[lo, hi)`` in order, then padding.

  Each batch: ``pixels`` (b,R,R,3) and ``vit_pixels`` (b,V,V,3) float32 (zeros in padded/unreadable rows),
  ``valid`` bool (b,) (a readable record), and lists ``index``, ``id``, ``caption``, ``error`` (None if readable,
  '' for padding rows).
  """
  if (hi - lo) > batch * num_batches:
    raise ValueError(f"{hi - lo} records do not fit in {num_batches} batches of {batch}")
  r, v = spec.resolution, spec.vit_size
  examples: Iterator[dict] = iter(())
  if hi > lo:
    ds = grain.MapDataset.range(lo, hi).map(LoadForCache(source, spec))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, threads), prefetch_buffer_size=max(2, batch)))
    if workers > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    examples = iter(it)
  for _ in range(num_batches):
    out = {
        "pixels": np.zeros((batch, r, r, 3), np.float32),
        "vit_pixels": np.zeros((batch, v, v, 3), np.float32),
        "valid": np.zeros((batch,), bool),
        "index": [-1] * batch,
        "id": [""] * batch,
        "caption": [None] * batch,
        "error": [""] * batch,
    }
    for row in range(batch):
      ex = next(examples, None)
      if ex is None:
        break
      out["index"][row], out["id"][row] = ex["index"], ex["id"]
      if ex["ok"]:
        out["pixels"][row], out["vit_pixels"][row] = ex["pixels"], ex["vit_pixels"]
        out["valid"][row], out["caption"][row], out["error"][row] = True, ex["caption"], None
      else:
        out["error"][row] = ex["error"]
    yield out


def make_source(data_cfg: Any, workdir: str | None = None) -> Any:
  """The configured image source (``sources.make_source`` with the cache's checks)."""
  return sources.make_source(image_spec(data_cfg), workdir)  # raises on data.cached=True
