"""Optimizers from the config: AdamW (IOMM-B/L) or Muon (IOMM-XL), with global-norm clipping and warm-up."""

from __future__ import annotations

import jax
import optax

from iomm_jax.config import LR_DECAYS, OPTIMIZERS


def lr_schedule(train_cfg, total_steps: int | None = None):
  """Linear warm-up from 0 to lr over warmup_steps, then `train.lr_decay`: 'constant' (the paper states no decay) or
  'cosine' down to lr·lr_final_fraction at `total_steps` (the run's resolved length: num_steps, or the steps that
  train.epochs gives). A short run at a high lr ends with noisy weights; decaying the step cleans its samples."""
  warmup = max(0, int(train_cfg.warmup_steps))
  if train_cfg.lr_decay == "constant":
    after = optax.constant_schedule(train_cfg.lr)
  elif train_cfg.lr_decay == "cosine":
    total = int(total_steps if total_steps is not None else train_cfg.num_steps)
    after = optax.cosine_decay_schedule(
        train_cfg.lr, decay_steps=max(1, total - warmup), alpha=float(train_cfg.lr_final_fraction)
    )
  else:
    raise ValueError(f"config.train.lr_decay={train_cfg.lr_decay!r}: expected one of {LR_DECAYS}")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, train_cfg.lr, warmup), after], [warmup])


# Muon's update RMS for every hidden matrix (Liu et al. 2025, "Muon is scalable": 0.2·sqrt(max(fan_in, fan_out))
# times the orthogonalised update). AdamW's steady-state update RMS with β = (0.9, 0.95) on noisy gradients is
# ≈ 0.2 as well, so one learning rate means the same step size for both (tests/test_optimizers.py measures it).
# optax's default scale, sqrt(max(1, fan_out/fan_in)), gives RMS ≈ 1/sqrt(width): 0.016 at 3840 wide, ≈ 14× smaller.
MUON_UPDATE_RMS = 0.2


def muon_labels(params, hidden_blocks: dict[str, tuple[str, ...]]):
  """'muon' for each 2-D kernel inside a hidden block stack, 'adam' for everything else.

  `params` is the generator's pure dict ({'dit': ..., 'rqa': ...}); `hidden_blocks[top]` names the block lists of
  that component (the modules' HIDDEN_BLOCKS). Embedders, the output projection, biases, norms and the RQA's
  meta-queries are not hidden matrices: Muon orthogonalises a matrix's update, which suits a map between two hidden
  spaces but not a lookup/embedding or the final read-out (Jordan et al.; Liu et al.)."""

  def label(path, leaf):
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    hidden = len(keys) > 2 and keys[1] in hidden_blocks.get(keys[0], ())
    return "muon" if hidden and keys[-1] == "kernel" and leaf.ndim == 2 else "adam"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    train_cfg, hidden_blocks: dict[str, tuple[str, ...]] | None = None, total_steps: int | None = None
) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) → AdamW(β, eps, wd), or Muon on the hidden matrices + AdamW on the rest.

  `hidden_blocks` (Muon only) names each component's hidden block stacks (see `muon_labels`); `total_steps` is the
  run's length for a decaying schedule (`lr_schedule`)."""
  schedule = lr_schedule(train_cfg, total_steps)
  adamw = lambda: optax.adamw(
      schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps, weight_decay=train_cfg.weight_decay  # noqa: E731
  )
  if train_cfg.optimizer == "adamw":
    opt = adamw()
  elif train_cfg.optimizer == "muon":
    if hidden_blocks is None:
      raise ValueError("make_optimizer: Muon needs hidden_blocks (which block stacks hold the hidden matrices)")
    muon = optax.contrib.muon(
        schedule, beta=train_cfg.muon_momentum, weight_decay=train_cfg.weight_decay, consistent_rms=MUON_UPDATE_RMS
    )
    # optax.contrib.muon applies AdamW itself to what it does not orthogonalise, but only by dimensionality; the
    # explicit partition keeps embedders, read-out and meta-queries on the same AdamW as the 'adamw' optimizer.
    opt = optax.multi_transform({"muon": muon, "adam": adamw()}, lambda params: muon_labels(params, hidden_blocks))
  else:
    raise ValueError(f"config.train.optimizer={train_cfg.optimizer!r}: expected one of {OPTIMIZERS}")
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), opt)
  return opt


def ema_update(ema, params, decay: float):
  """ema ← decay·ema + (1 − decay)·params, leaf by leaf in fp32."""
  return jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
