"""bench/condition_path.py: the generator through the real MLLM → adapter condition — its captions, views and one
short run."""

import sys

import numpy as np
import pytest

from helpers import ROOT, run_bench
from iomm_jax.data import decode, shapes

sys.path.insert(0, ROOT)
from bench import condition_path  # noqa: E402


def test_captions_and_views_are_the_worlds_own():
  images, labels = shapes.single_object_set(8, 64, seed=5)
  # The scenes single_object_set keeps, in order, carry the captions the bench rebuilds from the labels.
  want = [
      shapes.caption_of(sc["objects"]) for sc in (shapes.scene(i, 5) for i in range(200)) if len(sc["objects"]) == 1
  ][:8]
  assert [condition_path.caption(s, c) for s, c in labels] == want
  pixels, vit = condition_path.views_of(images, 32, 64)
  assert pixels.shape == (8, 32, 32, 3) and vit.shape == (8, 64, 64, 3)
  assert -1.0 <= pixels.min() and pixels.max() <= 1.0
  np.testing.assert_allclose(vit[0], decode.vit_normalize(images[0]), atol=1e-6)  # same size: no resampling


def test_caption_arrays_left_align_each_caption():
  lengths = {"a red circle": 3, "a purple hexagon": 5}
  ids, lens = condition_path.caption_arrays(lambda text: list(range(1, 1 + lengths[text])), [(0, 0), (5, 4)], 8)
  assert list(lens) == [3, 5]
  np.testing.assert_array_equal(ids, [[1, 2, 3, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 0, 0, 0]])


@pytest.mark.slow
def test_short_image_path_run_prints_one_json_line():
  result = run_bench(
      "condition_path.py",
      "--config=configs/tiny.py",
      "--path=image",
      "--steps=2",
      "--eval_every=2",
      "--num=6",
      "--images=32",
      "--config.train.repa_weight=0.5",
  )
  assert result["bench"] == "condition_path" and result["path"] == "image" and result["mllm"] == "random"
  assert result["steps"] == 2 and result["repa_weight"] == 0.5 and result["mask_ratio"] == 0.5
  (point,) = result["curve"]
  assert point["step"] == 2 and 0.0 < point["repa"] < 2.0
  assert all(0.0 <= point[k] <= 1.0 for k in ("shape", "colour", "one_object"))
