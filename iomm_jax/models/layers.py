"""Shared building blocks for every model in iomm_jax.

Conventions (docs/design.md §2, §4):
- Attribute names follow the PyTorch reference module tree, so a parameter's path in our NNX state is the
  PyTorch state-dict key with `kernel` for a Linear/Conv `weight` (transposed: (in, out) / HWIO) and
  `embedding` for an Embedding `weight`. `iomm_jax.models.keymap` relies on this.
- Every parameter carries logical axis names in the `axes` metadata; `iomm_jax.parallel` maps them to mesh
  axes through the rules table in the config.
- Parameters are stored in `param_dtype`; matmuls run in `dtype` (bf16 by config); norms, softmax and
  timestep embeddings compute in fp32.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
DType = Any


def torch_linear_init(fan_in: int):
  """PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Axes, dtype: DType) -> nnx.Param:
  """A parameter initialised with `init(key, shape, dtype)` and tagged with logical `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel stored (in, out). Matches torch.nn.Linear up to the transpose."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               axes: Axes = (None, None), dtype: DType = None, param_dtype: DType = jnp.float32,
               kernel_init=None, bias_init=None, rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    kinit = kernel_init or torch_linear_init(in_features)
    self.kernel = param(rngs, kinit, (in_features, out_features), axes, param_dtype)
    if use_bias:
      binit = bias_init or torch_linear_init(in_features)
      self.bias = param(rngs, binit, (out_features,), (axes[1],), param_dtype)
    else:
      self.bias = None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class Conv2d(nnx.Module):
  """NHWC convolution with an HWIO kernel; torch's Conv2d (OIHW) up to the transpose."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
               padding: int | str = 0, use_bias: bool = True, axes: Axes = (None, None, None, None),
               dtype: DType = None, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    self.stride, self.dtype = stride, dtype
    self.padding = padding if isinstance(padding, str) else [(padding, padding)] * 2
    fan_in = in_channels * kernel_size * kernel_size
    self.kernel = param(rngs, torch_linear_init(fan_in), (kernel_size, kernel_size, in_channels, out_channels),
                        axes, param_dtype)
    self.bias = param(rngs, torch_linear_init(fan_in), (out_channels,), (axes[3],), param_dtype) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), self.kernel[...].astype(dtype), window_strides=(self.stride, self.stride),
        padding=self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table `embedding` (vocab, dim); torch.nn.Embedding's `weight`."""

  def __init__(self, num_embeddings: int, features: int, *, axes: Axes = ("vocab", "embed"),
               dtype: DType = None, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(rngs, jax.nn.initializers.normal(1.0), (num_embeddings, features), axes, param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    table = self.embedding[...]
    return jnp.take(table, ids, axis=0).astype(self.dtype or table.dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * weight, computed in fp32 (torch RMSNorm / diffusers RMSNorm / Qwen2RMSNorm)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, use_weight: bool = True, axes: Axes = ("embed",),
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs | None = None):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=tuple(axes)) if use_weight else None

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.weight is not None:
      y = y * self.weight[...].astype(jnp.float32)
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis, fp32 statistics; `use_weight=False` is parameter-free."""

  def __init__(self, dim: int, *, eps: float = 1e-6, use_weight: bool = True, use_bias: bool = True,
               axes: Axes = ("embed",), param_dtype: DType = jnp.float32, rngs: nnx.Rngs | None = None):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=tuple(axes)) if use_weight else None
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=tuple(axes)) if use_bias and use_weight else None

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.eps,
                      None if self.weight is None else self.weight[...],
                      None if self.bias is None else self.bias[...])


def layer_norm(x: jax.Array, eps: float, weight: jax.Array | None = None, bias: jax.Array | None = None):
  """Functional LayerNorm with fp32 statistics; output in x's dtype."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  if weight is not None:
    y = y * weight.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              is_causal: bool = False, implementation: str | None = None) -> jax.Array:
  """Multi-head attention over (B, L, H, D) tensors; the one attention entry point of the project.

  k/v may have fewer heads than q (grouped-query attention). `mask` is boolean, True = attend, and
  broadcastable to (B, H, Lq, Lk); a (B, Lk) key-padding mask is accepted as a shorthand.
  `implementation` is None/'xla' or 'cudnn' (GPU, bf16/fp16 only), from the config.
  """
  if mask is not None and mask.ndim == 2:
    mask = mask[:, None, None, :]
  if implementation in (None, "xla"):
    # The XLA path: explicit fp32 softmax, also for bf16 inputs (docs/design.md §4 precision).
    return _xla_attention(q, k, v, mask, is_causal)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)


def _xla_attention(q, k, v, mask, is_causal):
  b, lq, h, d = q.shape
  hk = k.shape[2]
  if hk != h:
    k = jnp.repeat(k, h // hk, axis=2)
    v = jnp.repeat(v, h // hk, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
  if is_causal:
    causal = jnp.tril(jnp.ones((lq, k.shape[1]), bool), k.shape[1] - lq)
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    # Rows with no valid key (fully padded queries) give zeros, not a uniform average.
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       max_period: float = 10000.0, scale: float = 1.0) -> jax.Array:
  """Sinusoidal embedding of (B,) timesteps in fp32, as diffusers.models.embeddings.get_timestep_embedding."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = scale * args
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def count_params(state) -> int:
  """Number of scalars in an nnx.State / pytree of arrays or ShapeDtypeStructs."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state)))
