"""Euler sampling of the flow ODE with classifier-free guidance (pure functions).

Training regresses v = z − x along x_t = (1 − t)·x + t·z, so dx/dt = v: integrate from t = 1 (noise) to t = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iomm_jax.models import iomm


def shift_time(t: jax.Array, shift: float = 1.0) -> jax.Array:
  """The resolution shift of flow-matching times, t ← s·t / (1 + (s − 1)·t): s > 1 moves t towards 1 (noise). One
  map for training's t draws (train/loss.sample_t) and the sampler's grid, so the two cannot disagree."""
  if shift == 1.0:
    return t
  return shift * t / (1.0 + (shift - 1.0) * t)


def time_grid(steps: int, shift: float = 1.0) -> jax.Array:
  """steps + 1 times from 1 to 0 (uniform, optionally shifted like training's time_shift)."""
  return shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


def euler(velocity_fn, z: jax.Array, steps: int, shift: float = 1.0) -> jax.Array:
  """x_{t'} = x_t + (t' − t)·v(x_t, t) from t = 1 to 0; velocity_fn(x, t (B,)) -> v."""
  ts = time_grid(steps, shift)

  def body(x, i):
    t, t_next = ts[i], ts[i + 1]
    v = velocity_fn(x, jnp.full((x.shape[0],), t, jnp.float32))
    return (x + (t_next - t) * v.astype(x.dtype)), None

  x, _ = jax.lax.scan(body, z, jnp.arange(steps))
  return x


def guided(velocity_fn_batched, w: float):
  """CFG: v = v_u + w·(v_c − v_u), conditional and unconditional halves run as one doubled batch."""

  def fn(x, t):
    v = velocity_fn_batched(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
    v_c, v_u = jnp.split(v, 2)
    return v_u + w * (v_c - v_u)

  return fn


def generate(
    gen,
    mllm,
    ae,
    tpl: iomm.Templates,
    ids,
    valid,
    image_tokens,
    use_image,
    rng,
    *,
    latent_shape,
    steps: int,
    cfg_scale: float,
    condition: str = "query",
    shift: float = 1.0,
):
  """Images in [-1, 1] (B, H, W, 3) for per-sample condition ids/valid (and unmasked image tokens where use_image).

  The unconditional branch uses the empty-prompt template, as condition dropout does in training.
  """
  b = ids.shape[0]
  keep = jnp.ones((b, len(tpl.image_positions)), bool)
  h_c, m_c = iomm.encode_condition(gen.rqa, mllm, tpl, ids, valid, image_tokens, keep, use_image, mode=condition)
  u_ids = jnp.broadcast_to(jnp.asarray(tpl.uncond_ids), ids.shape)
  u_valid = jnp.broadcast_to(jnp.asarray(tpl.uncond_valid), valid.shape)
  h_u, m_u = iomm.encode_condition(
      gen.rqa, mllm, tpl, u_ids, u_valid, image_tokens, keep, jnp.zeros_like(use_image), mode=condition
  )
  h = jnp.concatenate([h_c, h_u])
  m = jnp.concatenate([m_c, m_u])

  def velocity(x, t):
    return gen.velocity(x, t, h, m, masked=condition == "all")

  z = jax.random.normal(rng, (b,) + tuple(latent_shape), jnp.float32)
  x = euler(guided(velocity, cfg_scale), z, steps, shift)
  return jnp.clip(ae.decode(x), -1.0, 1.0)
