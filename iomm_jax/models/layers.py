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

import iomm_jax.models.attention_kernels as attention_kernels

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


@jax.custom_vjp
def matmul_2d_weight_grad(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w whose weight gradient is one 2-D product, (tokens, in)ᵀ × (tokens, out), over all leading axes of x.

  What `Linear` runs on CPU. Autodiff of the N-D product contracts two or more axes for the weight gradient, and
  XLA:CPU first copies the output gradient into a transposed layout for it (measured: ≈ 12% of the mid-size
  DiT's gradient on one core). Reshaping x to 2-D in the forward pass instead gives the same gain on one device but is slower with the
  batch split over two host devices (0.41 s against 0.35 s a step), so the forward stays N-D.
  """
  return jnp.dot(x, w)


def _matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _matmul_bwd(residuals, dy):
  x, w = residuals
  dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, dy.reshape(-1, dy.shape[-1]))
  return jnp.dot(dy, w.T), dw


matmul_2d_weight_grad.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel stored (in, out). Matches torch.nn.Linear up to the transpose."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = True,
      axes: Axes = (None, None),
      dtype: DType = None,
      param_dtype: DType = jnp.float32,
      kernel_init=None,
      bias_init=None,
      rngs: nnx.Rngs,
  ):
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
    matmul = matmul_2d_weight_grad if jax.default_backend() == "cpu" else jnp.dot
    y = matmul(x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class Conv2d(nnx.Module):
  """NHWC convolution with an HWIO kernel; torch's Conv2d (OIHW) up to the transpose."""

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      kernel_size: int,
      *,
      stride: int = 1,
      padding: int | str = 0,
      use_bias: bool = True,
      axes: Axes = (None, None, None, None),
      dtype: DType = None,
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.stride, self.dtype = stride, dtype
    self.padding = padding if isinstance(padding, str) else [(padding, padding)] * 2
    fan_in = in_channels * kernel_size * kernel_size
    self.kernel = param(
        rngs, torch_linear_init(fan_in), (kernel_size, kernel_size, in_channels, out_channels), axes, param_dtype
    )
    self.bias = param(rngs, torch_linear_init(fan_in), (out_channels,), (axes[3],), param_dtype) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = jax.lax.conv_general_dilated(
        x.astype(dtype),
        self.kernel[...].astype(dtype),
        window_strides=(self.stride, self.stride),
        padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table `embedding` (vocab, dim); torch.nn.Embedding's `weight`."""

  def __init__(
      self,
      num_embeddings: int,
      features: int,
      *,
      axes: Axes = ("vocab", "embed"),
      dtype: DType = None,
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.embedding = param(rngs, jax.nn.initializers.normal(1.0), (num_embeddings, features), axes, param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    table = self.embedding[...]
    return jnp.take(table, ids, axis=0).astype(self.dtype or table.dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * weight, computed in fp32 (torch RMSNorm / diffusers RMSNorm / Qwen2RMSNorm)."""

  def __init__(
      self,
      dim: int,
      *,
      eps: float = 1e-6,
      use_weight: bool = True,
      axes: Axes = ("embed",),
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs | None = None,
  ):
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

  def __init__(
      self,
      dim: int,
      *,
      eps: float = 1e-6,
      use_weight: bool = True,
      use_bias: bool = True,
      axes: Axes = ("embed",),
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs | None = None,
  ):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=tuple(axes)) if use_weight else None
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=tuple(axes)) if use_bias and use_weight else None

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(
        x, self.eps, None if self.weight is None else self.weight[...], None if self.bias is None else self.bias[...]
    )


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


# The one attention setting of every module (config.model.attention; docs/design.md §4):
#   'auto'   jax.nn.dot_product_attention(implementation=None): XLA picks (cuDNN on GPU where it can); on CPU the
#            'xla' math with a hand-written backward from the saved probabilities (attention_kernels)
#   'cudnn'  the cuDNN fused kernel (GPU, model.dtype bfloat16); fails loudly where cuDNN cannot run the shapes
#   'xla'    the explicit fp32-softmax path, the reference the others are tested against
#   'splash' the Pallas splash-attention kernel shipped with JAX (TPU; `interpret=True` runs it on CPU in tests)
ATTENTION_IMPLS = ("auto", "cudnn", "xla", "splash")


def check_attention(implementation: str, where: str) -> str:
  """`implementation` if it is one of ATTENTION_IMPLS, else a ValueError naming `where`."""
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"{where}={implementation!r} is not one of {ATTENTION_IMPLS}")
  return implementation


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str = "auto",
) -> jax.Array:
  """Multi-head attention over (B, L, H, D) tensors; the one attention entry point of the project.

  k/v may have fewer heads than q (grouped-query attention; never repeated in memory). `mask` is boolean,
  True = attend: a (B, Lk) key-padding mask, or any 4-D mask broadcastable to (B, H, Lq, Lk). Query rows with no
  key to attend (fully padded) return zeros on every path. `implementation` is one of ATTENTION_IMPLS.
  """
  m = None if mask is None else attention_kernels.mask4(mask)
  if implementation == "xla":
    return attention_kernels.xla_attention(q, k, v, m, is_causal)
  if implementation == "splash":
    return attention_kernels.splash_attention(q, k, v, mask, is_causal)
  impl = {"auto": None, "cudnn": "cudnn"}[check_attention(implementation, "attention implementation")]
  if impl is None and jax.default_backend() == "cpu":
    return attention_kernels.saved_probs_attention(q, k, v, m, is_causal)
  if m is not None and impl == "cudnn":
    # cuDNN takes a full (B, 1|H, Lq, Lk) mask, not a broadcastable (B, 1, 1, Lk) one.
    m = jnp.broadcast_to(m, (q.shape[0], m.shape[1], q.shape[1], k.shape[1]))
  out = jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=is_causal, implementation=impl)
  return out if m is None else attention_kernels.zero_empty_rows(out, m, is_causal, k.shape[1])


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
    scale: float = 1.0,
) -> jax.Array:
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
