"""The pure training step: masked self-conditioning → RQA → frozen LLM → DiT velocity → flow-matching loss."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from iomm_jax.models import iomm, repa
from iomm_jax.train import loss as loss_lib
from iomm_jax.train.optimizers import ema_update
from iomm_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class StepStatics:
  """Everything static the step closes over: graph definitions, templates and the relevant config values."""

  gen_def: Any
  mllm_def: Any
  ae_def: Any
  templates: iomm.Templates
  mask_ratio: float
  p_uncond: float
  condition: str
  t_kwargs: dict  # train/loss.t_options
  loss_kwargs: dict  # train/loss.loss_options: space, edge weight, edge grid
  ema_decay: float
  needs_vit: bool  # False for text-only recipes: skip the ViT entirely
  cached: bool  # batch carries 'vit_tokens' and 'latent' instead of pixels
  grad_accum: int = 1  # microbatches per update (gradient accumulation)
  repa_weight: float = (
      0.0  # > 0: + this × the REPA alignment of the DiT's inner tokens with the MLLM's (models/repa.py)
  )
  skip_nonfinite: bool = (
      False  # config.train.on_nonfinite == 'skip': keep the old state when loss/grad norm is not finite
  )


def condition_inputs(st: StepStatics, mllm, ae, batch, rng):
  """Latents x, per-sample condition ids/validity, image tokens and the token keep-mask for one batch."""
  r_mask, r_drop = jax.random.split(rng)
  if st.cached:
    x = batch["latent"].astype(jnp.float32)
    tokens = batch["vit_tokens"] if st.needs_vit else None
  else:
    x = ae.encode(batch["pixels"])
    tokens = mllm.encode_image_tokens(batch["vit_pixels"]) if st.needs_vit else None
  x = jax.lax.stop_gradient(x)
  if tokens is not None:
    tokens = jax.lax.stop_gradient(tokens)
  b = x.shape[0]
  drop = jax.random.bernoulli(r_drop, st.p_uncond, (b,))
  ids, valid, use_image = iomm.condition_ids(
      st.templates, batch["caption_ids"], batch["caption_len"], batch["is_image_only"], drop
  )
  keep = iomm.sample_keep_mask(r_mask, (b, len(st.templates.image_positions)), st.mask_ratio)
  return x, ids, valid, tokens, keep, use_image


def compute_loss(st: StepStatics, params, frozen, batch, rng):
  """(loss, aux) of the generator params on one batch; frozen = {'mllm': ..., 'ae': ...} pure dicts."""
  r_cond, r_loss = jax.random.split(rng)
  mllm = nnx.merge(st.mllm_def, frozen["mllm"])
  ae = nnx.merge(st.ae_def, frozen["ae"])
  x, ids, valid, tokens, keep, use_image = condition_inputs(st, mllm, ae, batch, r_cond)
  gen = nnx.merge(st.gen_def, params)
  h, h_mask = iomm.encode_condition(gen.rqa, mllm, st.templates, ids, valid, tokens, keep, use_image, mode=st.condition)

  masked = st.condition == "all"
  if st.repa_weight <= 0:
    loss, aux = loss_lib.flow_matching_loss(
        lambda x_t, t: gen.velocity(x_t, t, h, h_mask, masked=masked),
        x,
        r_loss,
        t_kwargs=st.t_kwargs,
        **st.loss_kwargs,
    )
    aux["kept_fraction"] = keep.mean()
    return loss, aux

  def velocity(x_t, t):
    return gen.velocity_and_features(x_t, t, h, h_mask, masked=masked)

  loss, aux = loss_lib.flow_matching_loss(velocity, x, r_loss, t_kwargs=st.t_kwargs, has_aux=True, **st.loss_kwargs)
  # The target is the MLLM's tokens of the clean, unmasked image: the masking only touches the condition.
  align = repa.alignment_loss(gen.repa, aux.pop("velocity_aux"), tokens).mean()
  aux["kept_fraction"], aux["repa"] = keep.mean(), align
  return loss + st.repa_weight * align, aux


def microbatches(batch, n: int):
  """(B, …) arrays → (n, B/n, …); microbatch i holds rows i, i+n, i+2n, … .

  Strided rather than contiguous: each device's contiguous block of the batch then contributes equally to every
  microbatch, so a microbatch stays sharded over (data, fsdp) like the batch instead of living on 1/n of the devices.
  """

  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def loss_and_grads(st: StepStatics, params, frozen, batch, rng):
  """((loss, aux), grads) over the batch; with st.grad_accum = n > 1 the mean over n microbatches, run one after
  another under lax.scan (microbatch i uses fold_in(rng, i)), so activations are held for B/n images only."""
  grad_fn = jax.value_and_grad(lambda p, b, r: compute_loss(st, p, frozen, b, r), has_aux=True)
  n = st.grad_accum
  if n == 1:
    return grad_fn(params, batch, rng)
  micro = microbatches(batch, n)

  def body(total, xs):
    i, mb = xs
    out = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, total, out), None

  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(grad_fn, params, first, rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(n), micro))
  return jax.tree.map(lambda x: x / n, total)


# Per-example counts the pipeline attaches to a batch; the step sums them into the metrics and the model never sees them.
BATCH_COUNTS = ("skipped", "skipped_uncaptioned", "caption_truncated")


def train_step(st: StepStatics, optimizer: optax.GradientTransformation, lr_fn, state: TrainState, frozen, batch):
  """One update. Pure: the same state, frozen weights and batch give the same result on any mesh."""
  rng = jax.random.fold_in(state.rng, state.step)
  model_batch = {k: v for k, v in batch.items() if k not in BATCH_COUNTS}
  (loss, aux), grads = loss_and_grads(st, state.params, frozen, model_batch, rng)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = ema_update(state.ema_params, params, st.ema_decay) if st.ema_decay > 0 else state.ema_params
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": lr_fn(state.step),
      "kept_fraction": aux["kept_fraction"],
      **({"repa": aux["repa"]} if "repa" in aux else {}),
      "nonfinite": (~finite).astype(jnp.int32),
  }
  for key in BATCH_COUNTS:
    if key in batch:
      metrics[key] = jnp.sum(batch[key])
  if st.skip_nonfinite:
    # Skip the update, not the step: step (and with it the rng and the data position) still advances, so a skipped
    # step is one batch dropped, and the run stays deterministic.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    params, opt_state, ema = keep(params, state.params), keep(opt_state, state.opt_state), keep(ema, state.ema_params)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
  return new_state, metrics
