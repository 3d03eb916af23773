"""bench/oracle_condition.py: the perfect-condition generator bench — its scoring and one short run."""

import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, run_bench
from iomm_jax.data import shapes

sys.path.insert(0, ROOT)
from bench import oracle_condition  # noqa: E402


def test_score_reads_ground_truth_and_rejects_wrong_labels():
  images, labels = shapes.single_object_set(42, 32, seed=3)
  assert images.shape == (42, 32, 32, 3) and labels.shape == (42, 2)
  truth = oracle_condition.score(images, labels)
  assert truth["shape"] >= 0.9 and truth["colour"] >= 0.95 and truth["one_object"] >= 0.95
  shifted = np.stack([(labels[:, 0] + 1) % 6, (labels[:, 1] + 1) % 7], axis=1)  # every label wrong
  wrong = oracle_condition.score(images, shifted)
  assert wrong["shape"] <= 0.15 and wrong["colour"] <= 0.05 and wrong["one_object"] == truth["one_object"]
  blank = np.full_like(images, 230)  # nothing drawn: every category fails
  assert oracle_condition.score(blank, labels) == {"shape": 0.0, "colour": 0.0, "one_object": 0.0}


@pytest.mark.slow
def test_short_run_prints_one_json_line_and_a_grid(tmp_path):
  grid = tmp_path / "grid.png"
  result = run_bench(
      "oracle_condition.py",
      "--config=configs/tiny.py",
      "--steps=4",
      "--eval_every=2",
      "--num=12",
      "--images=64",
      f"--grid={grid}",
      timeout=600,
  )
  assert result["bench"] == "oracle_condition" and result["steps"] == 4 and result["global_batch"] == 16
  assert [p["step"] for p in result["curve"]] == [2, 4]
  assert all(0.0 <= p[k] <= 1.0 for p in result["curve"] for k in ("shape", "colour", "one_object"))
  assert result["chance_shape"] == round(1 / 6, 3) and result["s_per_step"] > 0
  assert Image.open(grid).size == (6 * 32, 2 * 32)  # 12 samples, one column per shape
