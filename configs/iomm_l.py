"""IOMM-L: ≈2.7B FLUX-style MM-DiT (width 2048 = 16×128, 10 double + 20 single blocks), InternVL3-2B, FLUX VAE.
Paper Table 4/5: AdamW, no EMA, r = 0.85, batch 512 (pre-train, 5 epochs) / 256 @512² and 96 @1024² (fine-tune)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _full_size import flux_mmdit, full_size_config  # noqa: E402


def get_config(arg: str | None = None):
  c = full_size_config(arg, pretrain_batch=512, ema_decay=0.0, mask_ratio=0.85)
  if c.train.stage == "pretrain":
    c.train.num_steps = 107_000  # 11M × 5 epochs / 512
  c.model.dit.kind = "mmdit"
  c.model.dit.arch = flux_mmdit(num_attention_heads=16)
  return c
