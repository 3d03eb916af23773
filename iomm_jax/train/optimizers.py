"""Optimizers from the config: AdamW (IOMM-B/L) or Muon (IOMM-XL), with global-norm clipping and warm-up."""

from __future__ import annotations

import jax
import optax


def lr_schedule(train_cfg):
  """Linear warm-up from 0 to lr over warmup_steps, then constant (the paper states no decay)."""
  if train_cfg.warmup_steps <= 0:
    return optax.constant_schedule(train_cfg.lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, train_cfg.lr, train_cfg.warmup_steps), optax.constant_schedule(train_cfg.lr)],
      [train_cfg.warmup_steps])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) → AdamW(β, eps, wd) or Muon (2-D weights; AdamW for the rest)."""
  schedule = lr_schedule(train_cfg)
  if train_cfg.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                      weight_decay=train_cfg.weight_decay)
  elif train_cfg.optimizer == "muon":
    # Muon orthogonalises the update of each 2-D weight matrix; embeddings-like and 1-D params use AdamW
    # (optax's muon does this split itself by dimensionality).
    opt = optax.contrib.muon(schedule, beta=train_cfg.b2, weight_decay=train_cfg.weight_decay,
                             adam_b1=train_cfg.b1, adam_b2=train_cfg.b2, adam_weight_decay=train_cfg.weight_decay)
  else:
    raise ValueError(f"config.train.optimizer={train_cfg.optimizer!r}: expected 'adamw' or 'muon'")
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), opt)
  return opt


def ema_update(ema, params, decay: float):
  """ema ← decay·ema + (1 − decay)·params, leaf by leaf in fp32."""
  return jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
