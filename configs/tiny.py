"""Tiny IOMM on procedural shapes: pixel space (identity autoencoder), a 0.47M-parameter MM-DiT and a frozen
InternVL-structured MLLM. Runs on 2 CPU cores in minutes (`make demo`).

The MLLM is the one `python -m iomm_jax.pretrain_mllm --config=configs/tiny_mllm.py --out=DIR` trains: pass
--config.model.mllm.path=DIR (as `make demo` does). Without a path it is randomly initialised from the same
architecture (tests, smoke runs), and understands nothing.

Variants: configs/tiny.py:ARG with ARG in {pretrain (default), pair_pretrain, finetune (mix), finetune_pair,
finetune_image}; add ',short' for a few-step smoke run. The fine-tuning variants read a captioned subset
(the first FINETUNE_PAIRS images) mixed with the whole image set (data.image_num_images), as the paper's stage 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tiny_mllm import TINY_MLLM_ARCH  # noqa: E402

from iomm_jax import config as schema  # noqa: E402

RESOLUTION = 32  # the generator's images: 64 DiT tokens of 4×4 pixels; the MLLM sees a 64² render of each
NUM_IMAGES = 4096  # the unlabeled image set of pre-training
FINETUNE_PAIRS = 512  # the captioned subset of fine-tuning: 1/8 of the images
_WIDTH = TINY_MLLM_ARCH["text"]["hidden_size"]  # the DiT's condition width is the MLLM's
# Pixel space: space-to-depth by _AE_FACTOR, then 2×2 patches → (RESOLUTION / 2·_AE_FACTOR)² = 64 DiT tokens.
_AE_FACTOR = RESOLUTION // 16
_LATENT_CHANNELS = 3 * _AE_FACTOR**2


def get_config(arg: str | None = None):
  stage, recipe, flags = schema.parse_variant(arg, known_flags=frozenset({"short"}))
  c = schema.base_config()
  c.model.dtype = "float32"
  c.model.frozen_dtype = "float32"
  c.model.dit.kind = "mmdit"
  # Pixel space: the DiT predicts the clean image, v = (x_t − x̂)/max(t, 0.05). Predicting v, a 64-wide DiT must pass each
  # token's 48 noisy values through to its output; at 64² (192 values a token) its samples stayed noise.
  c.model.prediction = "x"
  # The loss on the clean image that x̂ implies (= t² × the velocity loss). With the velocity loss an x-predicting
  # DiT's gradient is dominated by 1/t² at nearly clean inputs, where the condition barely matters: measured in one
  # stage 1 + stage 2 run each (README), text prompts' colour went from chance to 0.91 with 'clean'.
  c.train.loss_space = "clean"
  # diffusers FluxTransformer2DModel field names; in_channels = latent channels × 2×2 patch.
  c.model.dit.arch = dict(
      in_channels=_LATENT_CHANNELS * 4,
      num_layers=2,
      num_single_layers=2,
      attention_head_dim=16,
      num_attention_heads=4,
      joint_attention_dim=_WIDTH,
      pooled_projection_dim=_WIDTH,
      axes_dims_rope=(4, 6, 6),
      remat="none",
      scan_layers=False,
  )
  c.model.rqa.num_queries = 16
  c.model.rqa.num_heads = 4
  c.model.mllm.remat = "none"
  c.model.mllm.arch = TINY_MLLM_ARCH  # random init when model.mllm.path is '' (else read from the folder)
  c.model.autoencoder.kind = "identity"
  c.model.autoencoder.factor = _AE_FACTOR

  c.train.stage = stage
  # Measured on 2 CPU cores (README): lr 3e-3 and r = 0.5 made image conditioning visible within the budget, where
  # lr 1e-3 or r = 0.85 did not; batch 16 gives twice the updates of batch 32 in the same time.
  # Fixed lengths, so the demo's figures are reproducible: runs of 6000 + 3000, 3000 + 6000 and 7722 + 4000 steps
  # (README) drew single objects no better (text shape 0.20 / 0.20 / 0.07, colour 0.98 / 0.98 / 0.86). `make demo`
  # still stops a stage early on a machine too slow for its 15 minutes (train.time_budget_s, set by the Makefile).
  c.train.num_steps = 1200 if stage == "pretrain" else 600
  c.train.global_batch = 16
  c.train.mask_ratio = 0.5  # the paper's best ratio for IOMM-XL is 0.45 (0.85 for B/L)
  c.train.lr = 3e-3  # small model: a larger step than the paper's 1e-4
  c.train.warmup_steps = 100 if stage == "pretrain" else 20
  c.train.ema_decay = 0.99
  c.train.log_every = 25
  c.train.ckpt_every = c.train.num_steps
  c.train.keep_checkpoints = 2
  c.train.sample_every = c.train.num_steps
  c.train.eval_every = c.train.num_steps  # validation losses on the held-out draw of the world, at the end
  c.train.peak_flops = 1e11  # nominal CPU peak; MFU on CPU is only indicative

  c.data.source = "shapes"
  c.data.num_images = NUM_IMAGES
  c.data.resolution = RESOLUTION
  c.data.vit_size = TINY_MLLM_ARCH["vision"]["image_size"]
  if stage == "finetune":
    c.data.num_images = FINETUNE_PAIRS
    if recipe == "mix":
      c.data.image_source = "shapes"
      c.data.image_num_images = NUM_IMAGES
  c.data.recipe = recipe
  c.data.max_text_tokens = 32

  c.sample.steps = 25
  c.sample.cfg_scale = 4.5  # chosen for the demo among 1.5 / 3 / 4.5 (README), whatever the schema's default
  c.sample.prompts = ("a red circle", "a blue square above a green triangle")

  if "short" in flags:
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.ckpt_every = 10
    c.train.sample_every = 0
    c.train.eval_every = 0
    c.train.warmup_steps = 5
    c.sample.steps = 4
  return c
