"""Multi-axis rotary position embeddings (RoPE), shared by the MM-DiT (FLUX) and the S3-DiT (Z-Image).

Every token has `n_axes` integer (or real) positions, e.g. FLUX's (0, row, col) for image tokens and (0, 0, 0)
for text tokens. The head dimension is split into `axes_dims` chunks, axis i rotates its chunk with frequencies
theta^(-2j/axes_dims[i]) (j = 0 … axes_dims[i]/2 − 1) times its position, and the chunks are concatenated.

Two layouts of the rotated pairs exist in the references:

- 'interleaved': pairs are adjacent channels (x[2j], x[2j+1]). FLUX (diffusers `apply_rotary_emb` with
  use_real=True, use_real_unbind_dim=-1, cos/sin from `get_1d_rotary_pos_embed(repeat_interleave_real=True)`) and
  Z-Image (its complex `view_as_complex(x.reshape(..., -1, 2)) * freqs_cis`) both use this one; they are the same
  rotation written in real and in complex arithmetic. `rope_frequencies_complex` / `apply_rope_complex` give the
  Z-Image spelling.
- 'half': pairs are (x[j], x[j + D/2]) (GPT-NeoX "rotate half"; diffusers use_real_unbind_dim=-2 with
  concatenated cos/sin). With several axes, the angles of all axes are concatenated first.

All rotation arithmetic runs in fp32 and returns x's dtype, as the references do.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("interleaved", "half")


def _check(axes_dims: Sequence[int], n_axes: int):
  if len(axes_dims) != n_axes:
    raise ValueError(
        f"RoPE: ids have {n_axes} position axes but axes_dims={tuple(axes_dims)} has "
        f"{len(axes_dims)} entries; give one dimension per axis"
    )
  for d in axes_dims:
    if d % 2:
      raise ValueError(f"RoPE: every entry of axes_dims={tuple(axes_dims)} must be even (pairs of channels rotate)")


def _angles(ids: jax.Array, axes_dims: Sequence[int], theta: float) -> jax.Array:
  """Rotation angles (..., N, sum(axes_dims)/2) in fp32, axis chunks concatenated in order."""
  _check(axes_dims, ids.shape[-1])
  pos = ids.astype(jnp.float32)
  out = []
  for i, d in enumerate(axes_dims):
    # Inverse frequencies in float64 on the host (diffusers/Z-Image use float64 too), then fp32.
    inv = (1.0 / (float(theta) ** (np.arange(0, d, 2, dtype=np.float64) / d))).astype(np.float32)
    out.append(pos[..., i : i + 1] * jnp.asarray(inv))
  return jnp.concatenate(out, axis=-1)


def rope_frequencies(
    ids: jax.Array, axes_dims: Sequence[int], theta: float = 10000.0, *, layout: str = "interleaved"
) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each (..., N, sum(axes_dims)) fp32, for position ids (..., N, n_axes).

  'interleaved' repeats every frequency twice in place (c0 c0 c1 c1 …), exactly diffusers' FluxPosEmbed.
  'half' is [a, a] for the concatenation a of all axes' angles, so that rotate-half over the whole head pairs
  channel j with j + D/2 (for one axis: diffusers get_1d_rotary_pos_embed(repeat_interleave_real=False)).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"RoPE layout {layout!r} is not one of {LAYOUTS}")
  ang = _angles(ids, axes_dims, theta)
  ang = jnp.repeat(ang, 2, axis=-1) if layout == "interleaved" else jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def _broadcast_freqs(f: jax.Array, x: jax.Array) -> jax.Array:
  """(N, D) or (B, N, D) frequencies → broadcastable against x (B, N, H, D)."""
  if f.ndim == 2:
    return f[None, :, None, :]
  if f.ndim == 3:
    return f[:, :, None, :]
  raise ValueError(f"RoPE frequencies must be (N, D) or (B, N, D), got shape {f.shape}")


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, layout: str = "interleaved") -> jax.Array:
  """Rotate x (B, N, H, D) by (cos, sin) from `rope_frequencies` with the same layout; fp32 math, x's dtype out."""
  if x.shape[-1] != cos.shape[-1]:
    raise ValueError(f"RoPE: head dim {x.shape[-1]} != frequency dim {cos.shape[-1]} (sum of axes_dims)")
  xf = x.astype(jnp.float32)
  if layout == "interleaved":
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
  elif layout == "half":
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
  else:
    raise ValueError(f"RoPE layout {layout!r} is not one of {LAYOUTS}")
  out = xf * _broadcast_freqs(cos, x) + rotated * _broadcast_freqs(sin, x)
  return out.astype(x.dtype)


def rope_frequencies_complex(ids: jax.Array, axes_dims: Sequence[int], theta: float = 256.0) -> jax.Array:
  """Z-Image's spelling: complex64 exp(i·angle), (..., N, sum(axes_dims)/2)."""
  ang = _angles(ids, axes_dims, theta)
  return jax.lax.complex(jnp.cos(ang), jnp.sin(ang))


def apply_rope_complex(x: jax.Array, freqs_cis: jax.Array) -> jax.Array:
  """Z-Image's `apply_rotary_emb`: adjacent channel pairs as complex numbers times freqs_cis; x (B, N, H, D)."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  xc = jax.lax.complex(xf[..., 0], xf[..., 1])
  out = xc * _broadcast_freqs(freqs_cis, xc)
  return jnp.stack([jnp.real(out), jnp.imag(out)], axis=-1).reshape(x.shape).astype(x.dtype)
