"""Input-pipeline throughput: images/s delivered by data.pipeline (decode + crop + both views + batch).

    python bench/data.py --source shapes --resolution 64 --vit_size 56 --batch 32 --workers 0,1,2 --steps 20

``--config=configs/tiny.py[:arg] [--config.k=v ...]`` takes the data fields (source, path, resolution, views, recipe,
caption length) and the batch (``train.global_batch``) from a config file instead of the flags. ``--cached`` adds
the feature-cache mode: it writes the cache of the configured data with ``iomm_jax.cache`` into a temporary folder
(or reads ``--cache_path``) and measures the pipeline with ``data.cached=True`` (no decoding, no views).

``--source arrayrecord`` without ``--path`` first writes the shapes set as PNG ArrayRecord shards into a temporary
folder, so the figure includes PNG decoding. Prints ONE JSON line: images/s per worker count (median over
``--windows`` timed windows of ``--steps`` batches, after a warm-up), and the seconds to the first batch (worker
start-up). A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import _common  # noqa: E402


def _cfg(a, workers: int, path: str, cache_path: str = "") -> types.SimpleNamespace:
  if a.config_obj is not None:  # the config's data fields; workers/threads/prefetch from the flags
    return types.SimpleNamespace(
        **{
            **a.config_obj.data.to_dict(),
            "path": path,
            "num_workers": workers,
            "prefetch_buffer": a.prefetch,
            "num_threads": a.threads,
            "cached": bool(cache_path),
            "cache_path": cache_path,
        }
    )
  return types.SimpleNamespace(
      source=a.source,
      path=path,
      num_images=a.num_images,
      resolution=a.resolution,
      vit_size=a.vit_size,
      recipe=a.recipe,
      mix_lambda=0.5,
      num_workers=workers,
      seed=0,
      max_text_tokens=a.max_text_tokens,
      skip_uncaptioned=False,
      cached=False,
      cache_path="",
      prefetch_buffer=a.prefetch,
      num_threads=a.threads,
  )


def _tokenize(text: str) -> list[int]:
  return [hash(w) % 1000 for w in text.split()]


def measure(a, workers: int, path: str, cache_path: str = "") -> dict:
  from iomm_jax.data import pipeline

  t0 = time.perf_counter()
  it = iter(pipeline.make_dataset(_cfg(a, workers, path, cache_path), global_batch=a.batch, tokenize=_tokenize))
  next(it)
  first = time.perf_counter() - t0
  for _ in range(a.warmup):
    next(it)
  rates = []
  for _ in range(a.windows):
    t = time.perf_counter()
    for _ in range(a.steps):
      next(it)
    rates.append(a.steps * a.batch / (time.perf_counter() - t))
  if hasattr(it, "close"):
    it.close()
  return {"images_per_s": round(statistics.median(rates), 1), "first_batch_s": round(first, 2)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--source", choices=("shapes", "arrayrecord"), default="shapes")
  ap.add_argument("--path", default="", help="ArrayRecord dir/glob (default: write shapes into a temp dir)")
  ap.add_argument("--num_images", type=_common.count(), default=512)
  ap.add_argument("--resolution", type=_common.count(), default=64)
  ap.add_argument("--vit_size", type=_common.count(), default=56)
  ap.add_argument("--batch", type=_common.count(), default=32)
  ap.add_argument("--workers", type=_common.counts(0), default="0,1,2", help="comma-separated worker counts")
  ap.add_argument("--steps", type=_common.count(), default=20, help="batches per timed window")
  ap.add_argument("--windows", type=_common.count(), default=5)
  ap.add_argument("--warmup", type=_common.count(0), default=3)
  ap.add_argument("--threads", type=_common.count(), default=2, help="reader threads per process")
  ap.add_argument("--prefetch", type=_common.count(0), default=4, help="prefetch buffer (batches)")
  ap.add_argument("--recipe", default="mix")
  ap.add_argument("--max_text_tokens", type=_common.count(), default=32)
  ap.add_argument(
      "--config",
      default="",
      help="configs/X.py[:arg]: data fields and batch from this config; "
      "--config.<field>=<value> overrides as in iomm_jax.main",
  )
  ap.add_argument("--cached", action="store_true", help="also measure the feature-cache mode (data.cached=True)")
  ap.add_argument(
      "--cache_path",
      default="",
      help="an existing feature cache for --cached (default: write one "
      "of the configured data with iomm_jax.cache into a temp dir)",
  )
  argv = sys.argv[1:] if argv is None else list(argv)
  a, rest = ap.parse_known_args(argv)
  if not a.workers:
    ap.error("argument --workers: give one or more worker counts, such as 0,1,2")

  from absl import flags

  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  a.config_obj = _load_config(a.config, rest) if a.config else None
  if rest and a.config_obj is None:
    ap.error(f"unrecognized arguments: {rest}")
  if a.config_obj is not None:
    d = a.config_obj.data
    a.source, a.resolution, a.vit_size, a.batch = d.source, d.resolution, d.vit_size, a.config_obj.train.global_batch
  with tempfile.TemporaryDirectory() as tmp:
    path = a.path if a.config_obj is None else (a.path or a.config_obj.data.path)
    if a.source == "arrayrecord" and not path:
      from iomm_jax.data import shapes_shards

      path = os.path.join(tmp, "images")
      shapes_shards.write_arrayrecord(path, a.num_images, a.resolution, seed=0, shards=4, progress=False)
    out = {
        "bench": "data",
        "source": a.source,
        "resolution": a.resolution,
        "vit_size": a.vit_size,
        "batch": a.batch,
        "threads": a.threads,
    }
    if a.config:
      out["config"] = a.config
    for w in a.workers:
      out[f"workers_{w}"] = measure(a, w, path)
    if a.cached:
      cache_path = a.cache_path or _write_cache(a, path, os.path.join(tmp, "features"))
      out["cached_workers_0"] = measure(a, 0, path, cache_path=cache_path)
  print(json.dumps(out), flush=True)
  return 0


def _load_config(spec: str, overrides: list[str]):
  """configs/X.py[:arg] plus --config.k=v overrides, parsed by ml_collections config_flags and checked as training's
  command line checks them (a missing file or an unknown field is one line)."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  argv = ["bench", f"--config={spec}", *overrides]
  holder = config_flags.DEFINE_config_file(
      "config", None, "config file", flag_values=fv, lock_config=False, sys_argv=argv
  )
  _common.config_parser(holder, flag_values=fv)(argv)
  return holder.value


def _write_cache(a, path: str, dst: str) -> str:
  """The feature cache of the configured data (--config required: the frozen encoders come from it)."""
  if a.config_obj is None:
    raise SystemExit("--cached without --cache_path needs --config (the model whose features are cached)")
  from iomm_jax import cache

  c = a.config_obj
  c.data.path = path
  if c.data.source == "shapes" and not path:  # render a bounded set for the cache
    c.data.num_images = min(c.data.num_images, a.num_images)
  cache.write_cache(c, dst, shards=2, progress=False)
  return dst


if __name__ == "__main__":
  sys.exit(_common.run(main))
