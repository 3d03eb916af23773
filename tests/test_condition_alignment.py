"""bench/condition_alignment.py: probes fitted on image conditions, scored on images and on captions."""

import sys

import numpy as np
import pytest

from helpers import ROOT, run_bench

sys.path.insert(0, ROOT)
from bench import condition_alignment  # noqa: E402


def test_a_constant_offset_between_modalities_is_what_centring_removes():
  rng = np.random.default_rng(0)
  n, dim = 4, 12
  basis = rng.normal(size=(n, dim))  # one direction per class, shared by both modalities

  def features(labels, offset):
    return basis[labels] + 0.05 * rng.normal(size=(len(labels), dim)) + offset

  train_y, eval_y, text_y = rng.integers(0, n, 200), rng.integers(0, n, 80), np.repeat(np.arange(n), 10)
  offset = 6.0 * basis[0]  # text conditions sit far along class 0's direction: every raw read-out says class 0
  got = condition_alignment.alignment(
      features(train_y, 0.0), train_y, features(eval_y, 0.0), eval_y, features(text_y, offset), text_y, n
  )
  assert got["image_to_image"] == 1.0
  assert got["image_to_text"] == 0.25  # only class 0's captions read right
  assert got["image_to_text_centred"] == 1.0


def test_directions_that_differ_between_modalities_stay_unread_after_centring():
  rng = np.random.default_rng(1)
  n, dim = 3, 12
  image_basis, text_basis = rng.normal(size=(n, dim)), rng.normal(size=(n, dim))
  train_y, text_y = rng.integers(0, n, 150), np.repeat(np.arange(n), 30)
  train_x = image_basis[train_y] + 0.05 * rng.normal(size=(150, dim))
  text_x = text_basis[text_y] + 0.05 * rng.normal(size=(90, dim))
  got = condition_alignment.alignment(train_x, train_y, train_x, train_y, text_x, text_y, n)
  assert got["image_to_image"] == 1.0 and got["image_to_text_centred"] < 0.8


@pytest.mark.slow
def test_a_random_generator_prints_one_json_line():
  result = run_bench("condition_alignment.py", "--config=configs/tiny.py", "--num_train=24", "--num_eval=12")
  assert result["bench"] == "condition_alignment" and result["init"] == "random" and result["mllm"] == "random"
  for attr in ("shape", "colour"):
    assert set(result[attr]) == {"image_to_image", "image_to_text", "image_to_text_centred"}
    assert all(0.0 <= v <= 1.0 for v in result[attr].values())
