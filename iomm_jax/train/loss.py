"""Flow-matching loss (rectified flow, t = 1 is noise) and training-time sampling of t."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iomm_jax.config import LOSS_SPACES, T_SAMPLINGS


def sample_t(
    rng, batch: int, *, kind: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0
) -> jax.Array:
  """t ∈ (0, 1): uniform (paper) or logit-normal, then the resolution shift t ← s·t / (1 + (s − 1)·t)."""
  if kind == "uniform":
    t = jax.random.uniform(rng, (batch,), jnp.float32)
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,), jnp.float32))
  else:
    raise ValueError(f"config.train.t_sampling={kind!r}: expected one of {T_SAMPLINGS}")
  if shift != 1.0:
    t = shift * t / (1.0 + (shift - 1.0) * t)
  return t


def interpolate(x, z, t):
  """x_t = (1 − t)·x + t·z, broadcasting t (B,) over the latent dims."""
  tb = t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  return (1.0 - tb) * x + tb * z


def per_sample_loss(velocity_fn, x, z, t, *, space: str = "velocity", has_aux: bool = False):
  """(B,) mean squared error of ``velocity_fn(x_t, t)`` against z − x at given t (B,) and noise z (flow_matching_loss).

  space 'velocity' (FLUX, the paper) weighs every t alike in velocity; 'clean' multiplies each sample's loss by t²,
  which is the squared error of the clean latent the velocity implies, x̂ = x_t − t·v: the same minimiser, but the
  nearly clean inputs (small t, where the condition barely matters) no longer dominate the gradient by 1/t².
  ``has_aux``: velocity_fn returns (v, extra); the result is then (per-sample losses, extra).
  """
  v = velocity_fn(interpolate(x, z, t), t)
  if has_aux:
    v, extra = v
    return _weighted(v, x, z, t, space), extra
  return _weighted(v, x, z, t, space)


def _weighted(v, x, z, t, space: str):
  err = jnp.square(v.astype(jnp.float32) - (z - x).astype(jnp.float32))
  per_sample = err.reshape(err.shape[0], -1).mean(axis=1)
  if space == "clean":
    return per_sample * jnp.square(t)
  if space != "velocity":
    raise ValueError(f"config.train.loss_space={space!r}: expected one of {LOSS_SPACES}")
  return per_sample


def flow_matching_loss(velocity_fn, x, rng, *, t_kwargs=None, space: str = "velocity", has_aux: bool = False):
  """mean((v − (z − x))²) over every latent element at t ~ sample_t and z ~ N(0, I); `velocity_fn(x_t, t) -> v`.

  ``space``, ``has_aux``: see :func:`per_sample_loss`. Returns (loss, aux) with aux = {'t': t, 'per_sample': (B,)
  losses}, plus 'velocity_aux' (velocity_fn's extra output) with has_aux.
  """
  rng_t, rng_z = jax.random.split(rng)
  t = sample_t(rng_t, x.shape[0], **(t_kwargs or {}))
  z = jax.random.normal(rng_z, x.shape, jnp.float32).astype(x.dtype)
  out = per_sample_loss(velocity_fn, x, z, t, space=space, has_aux=has_aux)
  per_sample, extra = out if has_aux else (out, None)
  aux = {"t": t, "per_sample": per_sample}
  if has_aux:
    aux["velocity_aux"] = extra
  return per_sample.mean(), aux
