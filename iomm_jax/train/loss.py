"""Flow-matching loss (rectified flow, t = 1 is noise) and training-time sampling of t."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iomm_jax import sampling
from iomm_jax.config import LOSS_SPACES, T_SAMPLINGS
from iomm_jax.models import autoencoder


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
  return sampling.shift_time(t, shift)


def interpolate(x, z, t):
  """x_t = (1 − t)·x + t·z, broadcasting t (B,) over the latent dims."""
  tb = t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  return (1.0 - tb) * x + tb * z


def loss_options(config) -> dict:
  """The keyword arguments of :func:`flow_matching_loss` / :func:`per_sample_loss` that a config sets: the loss
  space, the edge weight, and the pixel grid the edges are taken on (the identity autoencoder's latent unfolded back
  to pixels; any other autoencoder's latent grid as it is)."""
  ae = config.model.autoencoder
  return dict(
      space=config.train.loss_space,
      edge_weight=float(config.train.edge_weight),
      edge_unfold=int(ae.factor) if ae.kind == "identity" else 1,
  )


def t_options(train_config) -> dict:
  """The keyword arguments of :func:`sample_t` that ``config.train`` sets."""
  t = train_config
  return dict(kind=t.t_sampling, logit_mean=t.logit_mean, logit_std=t.logit_std, shift=t.time_shift)


def per_sample_loss(
    velocity_fn,
    x,
    z,
    t,
    *,
    space: str = "velocity",
    edge_weight: float = 0.0,
    edge_unfold: int = 1,
    has_aux: bool = False,
):
  """(B,) mean squared error of ``velocity_fn(x_t, t)`` against z − x at given t (B,) and noise z (flow_matching_loss).

  space 'velocity' (FLUX, the paper) weighs every t alike in velocity; 'clean' multiplies each sample's loss by t²,
  which is the squared error of the clean latent the velocity implies, x̂ = x_t − t·v: the same minimiser, but the
  nearly clean inputs (small t, where the condition barely matters) no longer dominate the gradient by 1/t².
  ``edge_weight`` λ > 0 adds λ × the mean squared error of the target's spatial finite differences (horizontal and
  vertical neighbours, on the latent grid unfolded by ``edge_unfold``: see :func:`edge_error`), weighted by t alike:
  a frequency weighting of the same quadratic loss, so its minimiser is unchanged, in which the error at edges,
  where shapes differ, counts more than the error inside flat regions.
  ``has_aux``: velocity_fn returns (v, extra); the result is then (per-sample losses, extra).
  """
  v = velocity_fn(interpolate(x, z, t), t)
  extra = None
  if has_aux:
    v, extra = v
  err = v.astype(jnp.float32) - (z - x).astype(jnp.float32)
  per_sample = jnp.square(err).reshape(err.shape[0], -1).mean(axis=1)
  if edge_weight > 0:
    per_sample = per_sample + edge_weight * edge_error(err, edge_unfold)
  if space == "clean":
    per_sample = per_sample * jnp.square(t)
  elif space != "velocity":
    raise ValueError(f"config.train.loss_space={space!r}: expected one of {LOSS_SPACES}")
  return (per_sample, extra) if has_aux else per_sample


def edge_error(err: jax.Array, unfold: int = 1) -> jax.Array:
  """(B,) mean squared horizontal plus mean squared vertical difference of neighbouring values of ``err`` (B, h, w, C).

  ``unfold`` > 1 first undoes a space-to-depth by that factor ((B, h, w, c·f²) → (B, h·f, w·f, c), the identity
  autoencoder's layout), so the differences are between neighbouring pixels rather than latent positions.
  """
  if unfold > 1:
    err = autoencoder.depth_to_space(err, unfold)
  b = err.shape[0]
  dx = jnp.square(err[:, :, 1:] - err[:, :, :-1]).reshape(b, -1).mean(axis=1)
  dy = jnp.square(err[:, 1:] - err[:, :-1]).reshape(b, -1).mean(axis=1)
  return dx + dy


def flow_matching_loss(velocity_fn, x, rng, *, t_kwargs=None, has_aux: bool = False, **loss_kwargs):
  """mean((v − (z − x))²) over every latent element at t ~ sample_t and z ~ N(0, I); `velocity_fn(x_t, t) -> v`.

  ``has_aux`` and ``loss_kwargs`` (space, edge_weight, edge_unfold: :func:`loss_options`): see
  :func:`per_sample_loss`. Returns (loss, aux) with aux = {'t': t, 'per_sample': (B,)
  losses}, plus 'velocity_aux' (velocity_fn's extra output) with has_aux.
  """
  rng_t, rng_z = jax.random.split(rng)
  t = sample_t(rng_t, x.shape[0], **(t_kwargs or {}))
  z = jax.random.normal(rng_z, x.shape, jnp.float32).astype(x.dtype)
  out = per_sample_loss(velocity_fn, x, z, t, has_aux=has_aux, **loss_kwargs)
  per_sample, extra = out if has_aux else (out, None)
  aux = {"t": t, "per_sample": per_sample}
  if has_aux:
    aux["velocity_aux"] = extra
  return per_sample.mean(), aux
