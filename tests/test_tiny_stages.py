"""The tiny configs of the two-stage demo: the fine-tuning mix pairs a small captioned subset with the whole image
set, and held-out images lie past both."""

import numpy as np

from helpers import load_config, take
from iomm_jax import config_validation
from iomm_jax.data import pipeline
from iomm_jax.data import shapes
from iomm_jax.data.sources import heldout_shapes
from iomm_jax.models.processor import Processor
from iomm_jax.models import iomm


def test_finetune_mix_reads_a_small_captioned_subset_and_the_whole_image_set():
  c = load_config("tiny", "finetune")
  config_validation.validate(c)
  assert c.data.recipe == "mix" and c.data.mix_lambda == 0.5
  pairs, images = c.data.num_images, c.data.image_num_images
  assert images >= 8 * pairs  # the captioned subset is much smaller than the image set, as in the paper
  tok = iomm.Tokenize(Processor.tiny(num_image_tokens=16, image_size=c.data.vit_size), c.data.max_text_tokens)
  ds = pipeline.make_dataset(c.data, global_batch=64, tokenize=tok)
  batches = take(iter(ds), 4)
  from_image_set = np.concatenate([b["from_image_set"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  image_only = np.concatenate([b["is_image_only"] for b in batches])
  np.testing.assert_array_equal(from_image_set, image_only)
  assert index[~image_only].max() < pairs  # pair samples: the captioned subset only
  assert index[image_only].max() >= pairs  # image-only samples: the whole image set
  assert index[image_only].max() < images
  assert 0.3 < image_only.mean() < 0.7


def test_heldout_images_are_not_training_images():
  c = load_config("tiny")
  assert c.data.recipe == "image" and c.data.image_num_images == 0
  held, vit = heldout_shapes(c.data, 16)
  assert held.shape == (16, c.data.resolution, c.data.resolution, 3) and held.dtype == np.uint8
  assert vit.shape == (16, c.data.vit_size, c.data.vit_size, 3)
  train = [shapes.render(i, c.data.resolution, c.data.seed)[0] for i in range(64)]
  assert not any(np.array_equal(h, t) for h in held for t in train)
  assert heldout_shapes(c.data, 2, start=3)[0][0].tobytes() == held[3].tobytes()


def test_shapes_are_rendered_at_the_larger_view_so_the_vit_view_is_native():
  """The generator works at 32², the MLLM sees 64²: its view is a 64² render, as when the MLLM was trained."""
  from iomm_jax.data import decode, sources
  from iomm_jax.models import processor

  c = load_config("tiny")
  assert c.data.vit_size > c.data.resolution
  src = sources.make_source(c.data, None)
  rec = src[5]
  assert rec["image"].shape[0] == c.data.vit_size
  _, vit = decode.views(decode.to_rgb(rec), c.data.resolution, c.data.vit_size)
  native = shapes.render(5, c.data.vit_size, c.data.seed)[0]
  mean, std = (np.asarray(v, np.float32) for v in (processor.IMAGENET_MEAN, processor.IMAGENET_STD))
  want = (native.astype(np.float32) / 255.0 - mean) / std
  np.testing.assert_allclose(vit, want, atol=1e-6)
  # The MLLM was trained on exactly these views (configs/tiny_mllm.py renders at its ViT size).
  mllm = load_config("tiny_mllm")
  assert mllm.data.resolution == mllm.arch.vision.image_size == c.data.vit_size
