"""What prepare's full decode (the default) costs against --fast_verify: images/s of prepare.write_shards.

    python bench/prepare.py --num 200 --size 512 --repeats 3

Writes ``--num`` random-noise JPEGs of ``--size``² into a temporary folder, then times ``write_shards`` (one
process, one shard) with the full decode and with PIL's verify only, ``--repeats`` times each. Prints ONE JSON line
(median images/s of each). A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from iomm_jax.data import prepare, prepare_items


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--num", type=int, default=200)
  ap.add_argument("--size", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  tmp = Path(tempfile.mkdtemp())
  try:
    rng = np.random.default_rng(0)
    src = tmp / "src"
    src.mkdir()
    for i in range(a.num):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
      (src / f"{i:05d}.jpg").write_bytes(buf.getvalue())
    items = prepare_items.enumerate_items(str(src))
    rates = {"full_decode": [], "fast_verify": []}
    for r in range(a.repeats):
      for name in rates:
        t = time.perf_counter()
        s = prepare.write_shards(
            items, tmp / f"{name}{r}", 1, min_size=0, progress=False, full_decode=name == "full_decode"
        )
        rates[name].append(s["written"] / (time.perf_counter() - t))
    print(
        json.dumps(
            {
                "images": a.num,
                "size": a.size,
                "repeats": a.repeats,
                **{f"{k}_images_per_s": round(statistics.median(v), 1) for k, v in rates.items()},
            }
        )
    )
  finally:
    shutil.rmtree(tmp)


if __name__ == "__main__":
  main()
