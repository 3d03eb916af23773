"""Building blocks of the FLUX MM-DiT, named after diffusers' module tree (transformer_flux.py,
normalization.py, embeddings.py, attention.py) so parameter paths equal the PyTorch state-dict keys.

Precision: the residual streams are carried in fp32; each branch normalises in fp32, applies the adaLN
modulation in fp32, then runs its matmuls in the compute `dtype`. Modulation projections are zero-initialised
when `zero_init` (adaLN-Zero, as DiT does for training from scratch); otherwise everything uses PyTorch's default
Linear init like diffusers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from iomm_jax.models import layers
from iomm_jax.models.rope import apply_rope

_ZERO = jax.nn.initializers.zeros
TIME_PROJ_DIM = 256  # the timestep sinusoid's width, fixed in FLUX whatever the model width
F32 = jnp.float32


def _linear(din, dout, axes, *, zero=False, dtype, param_dtype, rngs, use_bias=True):
  kw = dict(kernel_init=_ZERO, bias_init=_ZERO) if zero else {}
  return layers.Linear(din, dout, axes=axes, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=use_bias, **kw)


def _modulate(x_norm: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x·(1+scale)+shift with (B, D) shift/scale broadcast over tokens, fp32."""
  return x_norm * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _chunks(emb: jax.Array, n: int) -> list[jax.Array]:
  return jnp.split(emb.astype(F32), n, axis=-1)


class TimestepEmbedding(nnx.Module):
  """diffusers TimestepEmbedding / PixArtAlphaTextProjection(act='silu'): linear_1 → SiLU → linear_2."""

  def __init__(self, din: int, dim: int, *, dtype, param_dtype, rngs):
    self.linear_1 = _linear(din, dim, (None, "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_2 = _linear(dim, dim, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
  """temb = MLP(sinusoid_256(t)) + MLP(pooled); t already scaled to [0, 1000]. Output fp32."""

  def __init__(self, dim: int, pooled_dim: int, *, dtype, param_dtype, rngs):
    self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text_embedder = TimestepEmbedding(pooled_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, timestep, pooled):
    t_proj = layers.timestep_embedding(timestep, TIME_PROJ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    return self.timestep_embedder(t_proj).astype(F32) + self.text_embedder(pooled).astype(F32)


class AdaLayerNormZero(nnx.Module):
  """LayerNorm(no affine, eps 1e-6) modulated by linear(silu(temb)) → 6 chunks (shift/scale/gate × msa/mlp)."""

  def __init__(self, dim: int, *, zero_init: bool, dtype, param_dtype, rngs):
    self.linear = _linear(
        dim, 6 * dim, ("embed", "mlp"), zero=zero_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x, temb):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _chunks(self.linear(jax.nn.silu(temb)), 6)
    x = _modulate(layers.layer_norm(x.astype(F32), 1e-6), shift_msa, scale_msa)
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nnx.Module):
  """AdaLayerNormZero with 3 chunks (shift, scale, gate)."""

  def __init__(self, dim: int, *, zero_init: bool, dtype, param_dtype, rngs):
    self.linear = _linear(
        dim, 3 * dim, ("embed", "mlp"), zero=zero_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x, temb):
    shift, scale, gate = _chunks(self.linear(jax.nn.silu(temb)), 3)
    return _modulate(layers.layer_norm(x.astype(F32), 1e-6), shift, scale), gate


class AdaLayerNormContinuous(nnx.Module):
  """Final norm: LayerNorm(no affine, eps 1e-6) · (1+scale) + shift; note diffusers' chunk order (scale, shift)."""

  def __init__(self, dim: int, *, zero_init: bool, dtype, param_dtype, rngs):
    self.linear = _linear(
        dim, 2 * dim, ("embed", "mlp"), zero=zero_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x, temb):
    scale, shift = _chunks(self.linear(jax.nn.silu(temb)), 2)
    return _modulate(layers.layer_norm(x.astype(F32), 1e-6), shift, scale)


class GELUProj(nnx.Module):
  """diffusers activations.GELU(approximate='tanh'): `proj` then GELU-tanh."""

  def __init__(self, din: int, dout: int, *, dtype, param_dtype, rngs):
    self.proj = _linear(din, dout, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return layers.gelu_tanh(self.proj(x))


def _identity(x):  # stands in for torch.nn.Dropout(p=0) so `net.2` keeps its index
  return x


class FeedForward(nnx.Module):
  """diffusers FeedForward(activation_fn='gelu-approximate', mult=4): net.0.proj → GELU-tanh → net.2."""

  def __init__(self, dim: int, *, dtype, param_dtype, rngs):
    self.net = nnx.List(
        [
            GELUProj(dim, 4 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            _identity,
            _linear(4 * dim, dim, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        ]
    )

  def __call__(self, x):
    for layer in self.net:
      x = layer(x)
    return x


class FluxAttention(nnx.Module):
  """Joint attention: q/k/v (+ add_q/k/v for the text stream in double blocks), per-head RMSNorm, RoPE."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, joint: bool, attention_impl, dtype, param_dtype, rngs):
    self.heads, self.head_dim, self.attention_impl = heads, head_dim, attention_impl
    inner = heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm_q = layers.RMSNorm(head_dim, eps=1e-6, axes=(None,), param_dtype=param_dtype)
    self.norm_k = layers.RMSNorm(head_dim, eps=1e-6, axes=(None,), param_dtype=param_dtype)
    self.to_q = _linear(dim, inner, ("embed", "heads"), **kw)
    self.to_k = _linear(dim, inner, ("embed", "kv"), **kw)
    self.to_v = _linear(dim, inner, ("embed", "kv"), **kw)
    if joint:
      self.to_out = nnx.List([_linear(inner, dim, ("heads", "embed"), **kw)])
      self.norm_added_q = layers.RMSNorm(head_dim, eps=1e-6, axes=(None,), param_dtype=param_dtype)
      self.norm_added_k = layers.RMSNorm(head_dim, eps=1e-6, axes=(None,), param_dtype=param_dtype)
      self.add_q_proj = _linear(dim, inner, ("embed", "heads"), **kw)
      self.add_k_proj = _linear(dim, inner, ("embed", "kv"), **kw)
      self.add_v_proj = _linear(dim, inner, ("embed", "kv"), **kw)
      self.to_add_out = _linear(inner, dim, ("heads", "embed"), **kw)
    self.joint = joint

  def _heads(self, x):
    return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

  def _qkv(self, x, q, k, v, nq, nk):
    return nq(self._heads(q(x))), nk(self._heads(k(x))), self._heads(v(x))

  def __call__(self, x, context, cos, sin, key_mask):
    """x (B, N, D) image stream, or the joint [text; image] stream of a single block when `context` is None.

    Returns the attention output over the (context ++ x) sequence: (ctx_out, x_out) for double blocks
    (after to_add_out / to_out.0), the raw (B, L+N, H·hd) output for single blocks.
    """
    q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
    if context is not None:
      cq, ck, cv = self._qkv(
          context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
      )
      q, k, v = (jnp.concatenate([a, b], axis=1) for a, b in ((cq, q), (ck, k), (cv, v)))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = layers.attention(q, k, v, mask=key_mask, implementation=self.attention_impl)
    out = out.reshape(*out.shape[:2], -1)
    if context is None:
      return out
    lc = context.shape[1]
    return self.to_add_out(out[:, :lc]), self.to_out[0](out[:, lc:])


class FluxTransformerBlock(nnx.Module):
  """Double-stream block: separate weights for the image and text streams, one joint attention."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, zero_init: bool, attention_impl, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = AdaLayerNormZero(dim, zero_init=zero_init, **kw)
    self.norm1_context = AdaLayerNormZero(dim, zero_init=zero_init, **kw)
    self.attn = FluxAttention(dim, heads, head_dim, joint=True, attention_impl=attention_impl, **kw)
    self.ff = FeedForward(dim, **kw)
    self.ff_context = FeedForward(dim, **kw)
    self.dtype = dtype

  def _cast(self, x):
    return x if self.dtype is None else x.astype(self.dtype)

  def __call__(self, hidden, context, temb, cos, sin, key_mask):
    """(hidden (B,N,D), context (B,L,D)) fp32 → (context, hidden) fp32, diffusers' return order."""
    nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden, temb)
    nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)
    c_attn, x_attn = self.attn(self._cast(nx), self._cast(nc), cos, sin, key_mask)

    hidden = hidden + gate_msa[:, None] * x_attn.astype(F32)
    nx = _modulate(layers.layer_norm(hidden, 1e-6), shift_mlp, scale_mlp)
    hidden = hidden + gate_mlp[:, None] * self.ff(self._cast(nx)).astype(F32)

    context = context + c_gate_msa[:, None] * c_attn.astype(F32)
    nc = _modulate(layers.layer_norm(context, 1e-6), c_shift_mlp, c_scale_mlp)
    context = context + c_gate_mlp[:, None] * self.ff_context(self._cast(nc)).astype(F32)
    return context, hidden


class FluxSingleTransformerBlock(nnx.Module):
  """Single-stream block over [text; image]: parallel attention and MLP, fused output projection."""

  def __init__(
      self,
      dim: int,
      heads: int,
      head_dim: int,
      *,
      zero_init: bool,
      attention_impl,
      dtype,
      param_dtype,
      rngs,
      mlp_ratio: float = 4.0,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    mlp = int(dim * mlp_ratio)
    self.norm = AdaLayerNormZeroSingle(dim, zero_init=zero_init, **kw)
    self.proj_mlp = _linear(dim, mlp, ("embed", "mlp"), **kw)
    self.proj_out = _linear(dim + mlp, dim, ("mlp", "embed"), **kw)
    self.attn = FluxAttention(dim, heads, head_dim, joint=False, attention_impl=attention_impl, **kw)
    self.dtype = dtype

  def __call__(self, hidden, context, temb, cos, sin, key_mask):
    """Same signature and return order as FluxTransformerBlock; the streams are split back at the end."""
    lc = context.shape[1]
    x = jnp.concatenate([context, hidden], axis=1)
    nx, gate = self.norm(x, temb)
    nx = nx if self.dtype is None else nx.astype(self.dtype)
    mlp = layers.gelu_tanh(self.proj_mlp(nx))
    attn = self.attn(nx, None, cos, sin, key_mask)
    x = x + gate[:, None] * self.proj_out(jnp.concatenate([attn.astype(mlp.dtype), mlp], axis=-1)).astype(F32)
    return x[:, :lc], x[:, lc:]
