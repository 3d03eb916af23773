"""Building blocks of the single-stream S3-DiT (Z-Image), mirroring diffusers' transformer_z_image.py.

Module and attribute names follow `diffusers.ZImageTransformer2DModel` exactly (`attention.to_q`,
`feed_forward.w1`, `adaLN_modulation.0`, `t_embedder.mlp.2`, ...) so our parameter paths are its state-dict
keys up to `kernel`↔`weight`. The Z-Image RoPE is different from FLUX's (`models/rope.py`): it multiplies
*interleaved* (real, imag) pairs of each head by complex frequencies looked up per axis from tables built
in float64, so it lives here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iomm_jax.models.layers import Linear, RMSNorm, attention, layer_norm, timestep_embedding

# Width of the timestep embedding that drives adaLN (diffusers' ADALN_EMBED_DIM), capped at `dim`.
ADALN_EMBED_DIM = 256
# Sinusoid width and hidden width of the timestep MLP (fixed in diffusers, independent of `dim`).
FREQ_EMBED_DIM = 256
T_MLP_HIDDEN = 1024
# Every image and caption segment is padded to a multiple of this many tokens (diffusers' SEQ_MULTI_OF).
SEQ_MULTI_OF = 32
# Z-Image hard-codes the QK-norm epsilon (independent of cfg.norm_eps).
QK_NORM_EPS = 1e-5


def ffn_hidden(dim: int) -> int:
  """SwiGLU hidden width used by Z-Image: int(dim / 3 * 8)."""
  return int(dim / 3 * 8)


# ---------------------------------------------------------------------------------------------- RoPE


@functools.lru_cache(maxsize=8)
def rope_tables(
    axes_dims: tuple[int, ...], axes_lens: tuple[int, ...], theta: float
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """Per-axis (cos, sin) tables of shape (axes_len, axes_dim // 2), float32.

  As diffusers' RopeEmbedder.precompute_freqs_cis: angles pos·θ^(−2i/d) in float64, rounded to float32,
  then cos/sin (here evaluated in float64 on the float32 angle, then rounded: within an ulp of torch.polar).
  """
  tables = []  # cached, hence read-only arrays
  for d, n in zip(axes_dims, axes_lens):
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    ang = np.outer(np.arange(n, dtype=np.float64), inv).astype(np.float32).astype(np.float64)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    cos.setflags(write=False)
    sin.setflags(write=False)
    tables.append((cos, sin))
  return tuple(tables)


def rope_lookup(tables, pos_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B, S, n_axes) integer positions → (cos, sin), each (B, S, head_dim // 2) float32."""
  cos, sin = [], []
  for i, (c, s) in enumerate(tables):
    cos.append(jnp.take(jnp.asarray(c), pos_ids[..., i], axis=0))
    sin.append(jnp.take(jnp.asarray(s), pos_ids[..., i], axis=0))
  return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate interleaved (real, imag) pairs of x (B, S, H, D) by (cos, sin) (B, S, D/2); fp32 inside."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = xf[..., 0], xf[..., 1]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# ------------------------------------------------------------------------------------------- modules


class SiLU(nnx.Module):
  """Parameter-free SiLU, so that `nnx.List` indices match torch's nn.Sequential indices."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.silu(x)


class TimestepEmbedder(nnx.Module):
  """Sinusoid (cos first, 256 wide) → Linear(256, 1024) → SiLU → Linear(1024, out); all in fp32."""

  def __init__(self, out_size: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    # Timestep embeddings run in fp32 regardless of the compute dtype (docs/design.md §4).
    self.mlp = nnx.List(
        [
            Linear(
                FREQ_EMBED_DIM, T_MLP_HIDDEN, axes=(None, None), dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
            ),
            SiLU(),
            Linear(T_MLP_HIDDEN, out_size, axes=(None, None), dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs),
        ]
    )

  def __call__(self, t: jax.Array) -> jax.Array:
    h = timestep_embedding(t, FREQ_EMBED_DIM, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    for layer in self.mlp:
      h = layer(h)
    return h


class Attention(nnx.Module):
  """Self-attention with per-head RMS QK-norm and Z-Image RoPE (diffusers Attention + ZSingleStreamAttnProcessor)."""

  def __init__(
      self,
      dim: int,
      n_heads: int,
      qk_norm: bool,
      *,
      attn_implementation: str = "auto",
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.n_heads, self.head_dim = n_heads, dim // n_heads
    self.attn_implementation = attn_implementation
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.to_q = Linear(dim, dim, axes=("embed", "heads"), **kw)
    self.to_k = Linear(dim, dim, axes=("embed", "kv"), **kw)
    self.to_v = Linear(dim, dim, axes=("embed", "kv"), **kw)
    self.to_out = nnx.List([Linear(dim, dim, axes=("heads", "embed"), **kw)])
    if qk_norm:
      self.norm_q = RMSNorm(self.head_dim, eps=QK_NORM_EPS, axes=(None,), param_dtype=param_dtype)
      self.norm_k = RMSNorm(self.head_dim, eps=QK_NORM_EPS, axes=(None,), param_dtype=param_dtype)
    else:
      self.norm_q = self.norm_k = None

  def __call__(self, x: jax.Array, mask: jax.Array | None, cos: jax.Array, sin: jax.Array) -> jax.Array:
    b, s, _ = x.shape
    q = self.to_q(x).reshape(b, s, self.n_heads, self.head_dim)
    k = self.to_k(x).reshape(b, s, self.n_heads, self.head_dim)
    v = self.to_v(x).reshape(b, s, self.n_heads, self.head_dim)
    if self.norm_q is not None:
      q, k = self.norm_q(q), self.norm_k(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = attention(q, k, v, mask=mask, implementation=self.attn_implementation)
    return self.to_out[0](o.reshape(b, s, -1))


class FeedForward(nnx.Module):
  """SwiGLU: w2(silu(w1 x) · w3 x), no biases."""

  def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.w1 = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.w2 = Linear(hidden, dim, axes=("mlp", "embed"), **kw)
    self.w3 = Linear(dim, hidden, axes=("embed", "mlp"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class ZImageTransformerBlock(nnx.Module):
  """Sandwich-norm block: x += g·norm2(attn(norm1(x)·s)); x += g'·norm2'(ffn(norm1'(x)·s')).

  With `modulation` the scales s = 1 + ·, gates g = tanh(·) come from `adaLN_modulation.0` applied to the
  timestep embedding (no SiLU before it, as in Z-Image); without it (context refiner) s = g = 1.
  """

  def __init__(
      self,
      dim: int,
      n_heads: int,
      norm_eps: float,
      qk_norm: bool,
      *,
      modulation: bool = True,
      attn_implementation: str = "auto",
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.attention = Attention(
        dim, n_heads, qk_norm, attn_implementation=attn_implementation, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.feed_forward = FeedForward(dim, ffn_hidden(dim), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = lambda: RMSNorm(dim, eps=norm_eps, axes=("embed",), param_dtype=param_dtype)  # noqa: E731
    self.attention_norm1, self.ffn_norm1 = norm(), norm()
    self.attention_norm2, self.ffn_norm2 = norm(), norm()
    if modulation:
      # Modulation is (B, 4·dim) per step: computed in fp32, it costs nothing.
      self.adaLN_modulation = nnx.List(
          [
              Linear(
                  min(dim, ADALN_EMBED_DIM),
                  4 * dim,
                  axes=(None, "embed"),
                  dtype=jnp.float32,
                  param_dtype=param_dtype,
                  rngs=rngs,
              )
          ]
      )
    else:
      self.adaLN_modulation = None

  def __call__(
      self, x: jax.Array, mask: jax.Array | None, cos: jax.Array, sin: jax.Array, adaln: jax.Array | None = None
  ) -> jax.Array:
    if self.adaLN_modulation is not None:
      if adaln is None:
        raise ValueError("ZImageTransformerBlock with modulation needs the timestep embedding `adaln`")
      mod = self.adaLN_modulation[0](adaln)[:, None, :]
      scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
      cast = lambda a: a.astype(x.dtype)  # noqa: E731
      scale_msa, scale_mlp = cast(1.0 + scale_msa), cast(1.0 + scale_mlp)
      gate_msa, gate_mlp = cast(jnp.tanh(gate_msa)), cast(jnp.tanh(gate_mlp))
      h = self.attention(self.attention_norm1(x) * scale_msa, mask, cos, sin)
      x = x + gate_msa * self.attention_norm2(h)
      h = self.feed_forward(self.ffn_norm1(x) * scale_mlp)
      return x + gate_mlp * self.ffn_norm2(h)
    h = self.attention(self.attention_norm1(x), mask, cos, sin)
    x = x + self.attention_norm2(h)
    return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class FinalLayer(nnx.Module):
  """Parameter-free LayerNorm (eps 1e-6) · (1 + adaLN(SiLU(t_emb))) → Linear to patch pixels."""

  def __init__(self, dim: int, out_channels: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.linear = Linear(dim, out_channels, axes=("embed", None), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.adaLN_modulation = nnx.List(
        [
            SiLU(),
            Linear(
                min(dim, ADALN_EMBED_DIM),
                dim,
                axes=(None, "embed"),
                dtype=jnp.float32,
                param_dtype=param_dtype,
                rngs=rngs,
            ),
        ]
    )

  def __call__(self, x: jax.Array, adaln: jax.Array) -> jax.Array:
    scale = 1.0 + self.adaLN_modulation[1](self.adaLN_modulation[0](adaln))
    x = layer_norm(x, 1e-6) * scale[:, None, :].astype(x.dtype)
    return self.linear(x)


def init_pad_token(dim: int, param_dtype) -> nnx.Param:
  """A learned (1, dim) pad embedding, zero-initialised as in diffusers."""
  return nnx.Param(jnp.zeros((1, dim), param_dtype), axes=(None, "embed"))


def round_up(n: int, multiple: int = SEQ_MULTI_OF) -> int:
  return n + (-n) % multiple
