"""Input-pipeline throughput: images/s delivered by data.pipeline (decode + crop + both views + batch).

    python bench/data.py --source shapes --resolution 64 --vit_size 56 --batch 32 --workers 0,1,2 --steps 20

``--source arrayrecord`` without ``--path`` first writes the shapes set as PNG ArrayRecord shards into a temporary
folder, so the figure includes PNG decoding. Prints ONE JSON line: images/s per worker count (median over
``--windows`` timed windows of ``--steps`` batches, after a warm-up), and the seconds to the first batch (worker
start-up). A benchmark, not a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types


def _cfg(a, workers: int, path: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(source=a.source, path=path, num_images=a.num_images, resolution=a.resolution,
                                 vit_size=a.vit_size, recipe=a.recipe, mix_lambda=0.5, num_workers=workers, seed=0,
                                 max_text_tokens=a.max_text_tokens, skip_uncaptioned=False, cached=False,
                                 cache_path="", prefetch_buffer=a.prefetch, num_threads=a.threads)


def _tokenize(text: str) -> list[int]:
    return [hash(w) % 1000 for w in text.split()]


def measure(a, workers: int, path: str) -> dict:
    from iomm_jax.data import pipeline

    t0 = time.perf_counter()
    it = iter(pipeline.make_dataset(_cfg(a, workers, path), global_batch=a.batch, tokenize=_tokenize))
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
    ap.add_argument("--num_images", type=int, default=512)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--vit_size", type=int, default=56)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--steps", type=int, default=20, help="batches per timed window")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="reader threads per process")
    ap.add_argument("--prefetch", type=int, default=4, help="prefetch buffer (batches)")
    ap.add_argument("--recipe", default="mix")
    ap.add_argument("--max_text_tokens", type=int, default=32)
    a = ap.parse_args(argv)

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    with tempfile.TemporaryDirectory() as tmp:
        path = a.path
        if a.source == "arrayrecord" and not path:
            from iomm_jax.data import shapes

            path = tmp
            shapes.write_arrayrecord(tmp, a.num_images, a.resolution, seed=0, shards=4, progress=False)
        out = {"bench": "data", "source": a.source, "resolution": a.resolution, "vit_size": a.vit_size,
               "batch": a.batch, "threads": a.threads}
        for w in (int(x) for x in a.workers.split(",")):
            out[f"workers_{w}"] = measure(a, w, path)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
