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
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench import _common  # noqa: E402
from iomm_jax.data import prepare, prepare_items  # noqa: E402


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--num", type=_common.count(), default=200, help="images written and timed")
  ap.add_argument("--size", type=_common.count(), default=512, help="their side in pixels")
  ap.add_argument("--repeats", type=_common.count(), default=3)
  a = ap.parse_args(argv)
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
  return 0


if __name__ == "__main__":
  sys.exit(_common.run(main))
