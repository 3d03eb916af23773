"""IOMM-XL: ≈6B single-stream S3-DiT following Z-Image (dim 3840, 30 layers, 30 heads, 2+2 refiners), InternVL3-2B,
FLUX VAE. Paper Table 4/5: Muon, no EMA, r = 0.45, batch 4096 (pre-train) / 256 (fine-tune @512², λ = 0.5)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _full_size import full_size_config  # noqa: E402

from iomm_jax.models.qwen2 import INTERNVL3_2B_LLM_WIDTH  # noqa: E402


def get_config(arg: str | None = None):
  c = full_size_config(arg, pretrain_batch=4096, ema_decay=0.0, mask_ratio=0.45)
  if c.train.stage == "pretrain":
    c.train.num_steps = 30_000
  c.train.optimizer = "muon"
  c.model.dit.kind = "s3dit"
  c.model.dit.arch = dict(
      dim=3840,
      n_layers=30,
      n_refiner_layers=2,
      n_heads=30,
      cap_feat_dim=INTERNVL3_2B_LLM_WIDTH,
      remat="full",
      scan_layers=True,
  )
  return c
