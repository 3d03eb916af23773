"""IOMM-B: ≈1.6B FLUX-style MM-DiT (width 1536 = 12×128, 10 double + 20 single blocks), InternVL3-2B, FLUX VAE.
Paper Table 4/5: AdamW, EMA 0.999, r = 0.85, batch 1024 (pre-train) / 256 @512² and 96 @1024² (fine-tune, λ = 0.5)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _full_size import flux_mmdit, full_size_config  # noqa: E402


def get_config(arg: str | None = None):
  c = full_size_config(arg, pretrain_batch=1024, ema_decay=0.999, mask_ratio=0.85)
  c.model.dit.kind = "mmdit"
  c.model.dit.arch = flux_mmdit(num_attention_heads=12)
  return c
