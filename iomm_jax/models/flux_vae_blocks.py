"""Building blocks of the FLUX autoencoder (diffusers' resnet.py, unet_2d_blocks.py, attention_processor.py), named
after diffusers' module tree so parameter paths equal AutoencoderKL's state-dict keys. NHWC; GroupNorm statistics
and the attention softmax in fp32, convolutions in the compute `dtype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from iomm_jax.models.layers import Conv2d, DType, Linear, attention

_CONV_AXES = (None, None, "conv_in", "conv_out")


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm (affine) over the channel (last) axis of NHWC input, fp32 statistics."""

  def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-6, param_dtype: DType = jnp.float32):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups")
    self.num_groups, self.eps = num_groups, eps
    self.weight = nnx.Param(jnp.ones((num_channels,), param_dtype), axes=(None,))
    self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype), axes=(None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    *lead, c = x.shape
    xf = x.astype(jnp.float32).reshape(*lead, self.num_groups, c // self.num_groups)
    axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)  # every spatial axis and the channels of a group
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def conv(cin: int, cout: int, k: int, *, padding: int, stride: int = 1, dtype, param_dtype, rngs) -> Conv2d:
  """A k×k convolution with the VAE's sharding axes (torch Conv2d's padding and stride)."""
  return Conv2d(
      cin, cout, k, stride=stride, padding=padding, axes=_CONV_AXES, dtype=dtype, param_dtype=param_dtype, rngs=rngs
  )


class ResnetBlock2D(nnx.Module):
  """norm1 → SiLU → conv1 → norm2 → SiLU → conv2, plus the (1×1 `conv_shortcut` when widths differ) skip."""

  def __init__(
      self,
      cin: int,
      cout: int,
      groups: int,
      *,
      eps: float = 1e-6,
      dtype: DType = None,
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = GroupNorm(groups, cin, eps=eps, param_dtype=param_dtype)
    self.conv1 = conv(cin, cout, 3, padding=1, **kw)
    self.norm2 = GroupNorm(groups, cout, eps=eps, param_dtype=param_dtype)
    self.conv2 = conv(cout, cout, 3, padding=1, **kw)
    self.conv_shortcut = conv(cin, cout, 1, padding=0, **kw) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return skip.astype(h.dtype) + h


class Downsample2D(nnx.Module):
  """Zero-pad one row/column at the bottom/right, then a 3×3 stride-2 conv (diffusers' padding=0 path)."""

  def __init__(self, channels: int, *, dtype: DType = None, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, padding=0, stride=2, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2× upsampling, then a 3×3 conv."""

  def __init__(self, channels: int, *, dtype: DType = None, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class SpatialSelfAttention(nnx.Module):
  """diffusers' mid-block Attention: GroupNorm, one head over all H·W positions, residual."""

  def __init__(
      self,
      channels: int,
      groups: int,
      *,
      eps: float = 1e-6,
      attn_implementation: str = "auto",
      dtype: DType = None,
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.attn_implementation = attn_implementation
    kw = dict(axes=("conv_in", "conv_out"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.group_norm = GroupNorm(groups, channels, eps=eps, param_dtype=param_dtype)
    self.to_q = Linear(channels, channels, **kw)
    self.to_k = Linear(channels, channels, **kw)
    self.to_v = Linear(channels, channels, **kw)
    self.to_out = nnx.List([Linear(channels, channels, **kw)])  # torch: to_out = [Linear, Dropout]

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, 1, c)
    o = attention(self.to_q(t), self.to_k(t), self.to_v(t), implementation=self.attn_implementation)
    return x + self.to_out[0](o.reshape(b, h, w, c)).astype(x.dtype)


class UNetMidBlock2D(nnx.Module):
  """resnet → (attention) → resnet at the lowest resolution."""

  def __init__(
      self,
      channels: int,
      groups: int,
      *,
      add_attention: bool,
      attn_implementation: str,
      dtype: DType = None,
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])
    # diffusers keeps `attentions = [None]` without attention; we keep no attribute for it then.
    self.attentions = (
        nnx.List([SpatialSelfAttention(channels, groups, attn_implementation=attn_implementation, **kw)])
        if add_attention
        else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class _ResnetStack(nnx.Module):
  """`num_layers` ResnetBlock2Ds (the first cin → cout), then an optional 2× resampler, kept under the attribute
  name diffusers gives it (`RESAMPLER`: 'downsamplers' / 'upsamplers') so parameter paths match its keys."""

  RESAMPLER: str
  RESAMPLER_CLASS: type

  def __init__(
      self,
      cin: int,
      cout: int,
      num_layers: int,
      groups: int,
      *,
      resample: bool,
      dtype: DType = None,
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(num_layers)])
    setattr(self, self.RESAMPLER, nnx.List([self.RESAMPLER_CLASS(cout, **kw)]) if resample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    resampler = getattr(self, self.RESAMPLER)
    return resampler[0](x) if resampler is not None else x


class DownEncoderBlock2D(_ResnetStack):
  """diffusers' DownEncoderBlock2D: resnets, then a stride-2 convolution unless it is the last block."""

  RESAMPLER, RESAMPLER_CLASS = "downsamplers", Downsample2D


class UpDecoderBlock2D(_ResnetStack):
  """diffusers' UpDecoderBlock2D: resnets, then nearest 2× upsampling + convolution unless it is the last block."""

  RESAMPLER, RESAMPLER_CLASS = "upsamplers", Upsample2D
