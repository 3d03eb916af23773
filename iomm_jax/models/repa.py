"""Representation alignment (REPA, Yu et al., ICLR 2025) against the frozen MLLM's own view of the image.

A small MLP head maps the DiT's image tokens from inside the network (`dit_families` `predict(..., features=True)`)
to the frozen MLLM's image tokens of the *clean, unmasked* image — the tokens the MLLM's language model reads, which
the training step computes anyway for the condition. The loss is 1 − cosine similarity per token, both grids
resized to their common (coarser) size: the DiT's noisy-input tokens must carry what the MLLM sees in the clean
image, its shapes included. Not in the IOMM paper: an option (`config.train.repa_weight`, 0 = off) that makes a
from-scratch DiT learn object shape faster; the head is training-only and is not exported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from iomm_jax.models.layers import Linear

MAX_HIDDEN = 2048  # the head's hidden width is min(2 × DiT width, this): REPA's 2048 for a 1152-wide DiT


def hidden_width(in_dim: int) -> int:
  """The head's hidden width for a DiT of width ``in_dim``."""
  return min(2 * in_dim, MAX_HIDDEN)


class RepaProjector(nnx.Module):
  """Three Linear layers with SiLU between: DiT width → hidden → hidden → MLLM width."""

  def __init__(self, in_dim: int, out_dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    hidden = hidden_width(in_dim)
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Linear(in_dim, hidden, axes=("embed", "mlp"), **kw)
    self.fc2 = Linear(hidden, hidden, axes=("mlp", None), **kw)
    self.fc3 = Linear(hidden, out_dim, axes=(None, "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc3(jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(x.astype(jnp.float32))))))


def target_grid(target: jax.Array) -> jax.Array:
  """(B, M, D) MLLM image tokens (row-major over a square grid) → (B, s, s, D)."""
  b, m, d = target.shape
  side = int(round(m**0.5))
  if side * side != m:
    raise ValueError(f"REPA: the MLLM's {m} image tokens do not form a square grid")
  return target.reshape(b, side, side, d)


def _resize(x: jax.Array, h: int, w: int) -> jax.Array:
  """Shrink (B, H, W, D) to (B, h, w, D): the mean over each cell when h, w divide H, W (the usual case: both grids
  cover the same square, e.g. 8×8 DiT tokens against 4×4 MLLM tokens), else antialiased linear resizing."""
  b, hh, ww, d = x.shape
  if (hh, ww) == (h, w):
    return x
  if hh % h == 0 and ww % w == 0:
    return x.reshape(b, h, hh // h, w, ww // w, d).mean(axis=(2, 4))
  return jax.image.resize(x, (b, h, w, d), "linear", antialias=True)


def alignment_loss(projector: RepaProjector, tokens: jax.Array, target: jax.Array) -> jax.Array:
  """(B,) mean over the common grid of 1 − cos(projector(DiT tokens), MLLM tokens).

  tokens (B, h, w, D_dit) from the DiT; target (B, M, D_mllm) the frozen MLLM's image tokens (no gradient flows
  into them). Both are resized to (min(h, s), min(w, s)), s = √M, after the projection.
  """
  grid = target_grid(jax.lax.stop_gradient(target).astype(jnp.float32))
  z = projector(tokens)
  h, w = min(z.shape[1], grid.shape[1]), min(z.shape[2], grid.shape[2])
  z, grid = _resize(z, h, w), _resize(grid, h, w)
  eps = 1e-6
  cos = (z * grid).sum(-1) / (jnp.linalg.norm(z, axis=-1) * jnp.linalg.norm(grid, axis=-1) + eps)
  return (1.0 - cos).reshape(cos.shape[0], -1).mean(axis=1)
