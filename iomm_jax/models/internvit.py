"""InternViT (the vision tower of InternVL3), numerically equal to `transformers.InternVLVisionModel`.

Attribute tree = the transformers module tree: `embeddings.{cls_token, position_embeddings,
patch_embeddings.projection}`, `encoder.layer.{i}.{attention.{q,k,v}_proj, attention.projection_layer,
attention.{q,k}_norm, mlp.fc1/fc2, layernorm_before/after, lambda_1/lambda_2}`, `layernorm` (only when
`use_mean_pooling` is False). Pixel input is NHWC (B, H, W, 3), already normalised.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iomm_jax.models import layers

ACTIVATIONS = {"gelu": layers.gelu_exact, "gelu_pytorch_tanh": layers.gelu_tanh, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class InternViTConfig:
  """Vision tower sizes; defaults are InternViT-300M-448px-V2.5 as in InternVL3-2B-hf."""

  image_size: int = 448
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 1024
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  intermediate_size: int = 4096
  norm_type: str = "layer_norm"  # 'layer_norm' | 'rms_norm'
  use_qk_norm: bool = False
  layer_scale_init_value: float = 0.1  # initial value of lambda_1/lambda_2 (loaded weights override it)
  layer_norm_eps: float = 1e-6
  attention_bias: bool = True
  hidden_act: str = "gelu"
  use_mean_pooling: bool = True  # True: no final layernorm (transformers uses nn.Identity)
  use_mask_token: bool = False  # a stored (unused) mask_token parameter
  use_absolute_position_embeddings: bool = True

  def __post_init__(self):
    if self.norm_type not in ("layer_norm", "rms_norm"):
      raise ValueError(f"InternViTConfig.norm_type={self.norm_type!r}; expected 'layer_norm' or 'rms_norm'")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"InternViTConfig: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"InternViTConfig.hidden_act={self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of torch's 1-D bicubic interpolation (A=-0.75, align_corners=False, edge clamp).

  `F.interpolate(mode='bicubic')` is separable, so resizing an (h, w) grid is Mh @ X @ Mw.T exactly.
  """
  a = -0.75
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = scale * (o + 0.5) - 0.5  # torch does not clamp the source index for cubic
    i0 = math.floor(src)
    t = src - i0
    w = [
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ]
    for k in range(4):
      m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w[k]
  return m.astype(np.float32)


class InternViTPatchEmbeddings(nnx.Module):

  def __init__(self, cfg: InternViTConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.projection = layers.Conv2d(
        cfg.num_channels,
        cfg.hidden_size,
        cfg.patch_size,
        stride=cfg.patch_size,
        axes=(None, None, None, "embed"),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    y = self.projection(pixel_values)  # (B, h, w, D)
    return y.reshape(y.shape[0], -1, y.shape[-1])  # row-major, as torch flatten(2)


class InternViTEmbeddings(nnx.Module):
  """CLS token + patch embeddings + absolute position embeddings (bicubic-interpolated for other sizes)."""

  def __init__(self, cfg: InternViTConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.cfg, self.dtype = cfg, dtype
    self.cls_token = nnx.Param(jnp.zeros((1, 1, d), param_dtype), axes=(None, None, "embed"))
    self.mask_token = (
        nnx.Param(jnp.zeros((1, 1, d), param_dtype), axes=(None, None, "embed")) if cfg.use_mask_token else None
    )
    self.patch_embeddings = InternViTPatchEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.position_embeddings = (
        nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, cfg.grid**2 + 1, d), param_dtype), axes=(None, None, "embed")
        )
        if cfg.use_absolute_position_embeddings
        else None
    )

  def _positions(self, height: int, width: int) -> jax.Array:
    pos = self.position_embeddings[...]
    n_pos = pos.shape[1] - 1
    new_h, new_w = height // self.cfg.patch_size, width // self.cfg.patch_size
    if new_h * new_w == n_pos and height == width:
      return pos
    side = int(round(math.sqrt(n_pos)))
    grid = pos[0, 1:].astype(jnp.float32).reshape(side, side, -1)
    mh = jnp.asarray(torch_bicubic_matrix(side, new_h))
    mw = jnp.asarray(torch_bicubic_matrix(side, new_w))
    hp = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("ab,bcd->acd", mh, grid, precision=hp)
    grid = jnp.einsum("ec,acd->aed", mw, grid, precision=hp)
    patch = grid.reshape(1, new_h * new_w, -1).astype(pos.dtype)
    return jnp.concatenate([pos[:, :1], patch], axis=1)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    b, height, width, _ = pixel_values.shape
    x = self.patch_embeddings(pixel_values)
    dtype = x.dtype
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    if self.position_embeddings is not None:
      x = x + self._positions(height, width).astype(dtype)
    return x


class InternViTAttention(nnx.Module):
  """Bidirectional MHA; optional RMSNorm over the full q/k width (eps 1e-6, as transformers)."""

  def __init__(self, cfg: InternViTConfig, *, attention_impl: str, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads, self.head_dim, self.attention_impl = (
        cfg.num_attention_heads,
        d // cfg.num_attention_heads,
        attention_impl,
    )
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = layers.Linear(d, d, use_bias=cfg.attention_bias, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Linear(d, d, use_bias=cfg.attention_bias, axes=("embed", "heads"), **kw)
    self.v_proj = layers.Linear(d, d, use_bias=cfg.attention_bias, axes=("embed", "heads"), **kw)
    self.projection_layer = layers.Linear(d, d, axes=("heads", "embed"), **kw)
    if cfg.use_qk_norm:
      self.q_norm = layers.RMSNorm(d, eps=1e-6, axes=("heads",), param_dtype=param_dtype)
      self.k_norm = layers.RMSNorm(d, eps=1e-6, axes=("heads",), param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    b, l, d = x.shape
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    shape = (b, l, self.num_heads, self.head_dim)
    o = layers.attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), implementation=self.attention_impl)
    return self.projection_layer(o.reshape(b, l, d))


class InternViTMLP(nnx.Module):

  def __init__(self, cfg: InternViTConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = layers.Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.fc2 = layers.Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
    self.act = cfg.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


def _norm(cfg: InternViTConfig, param_dtype):
  if cfg.norm_type == "layer_norm":
    return layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
  return layers.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)


class InternViTLayer(nnx.Module):
  """x + λ1·attn(norm(x)); then x + λ2·mlp(norm(x))."""

  def __init__(self, cfg: InternViTConfig, *, attention_impl: str, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.attention = InternViTAttention(
        cfg, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.mlp = InternViTMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layernorm_before = _norm(cfg, param_dtype)
    self.layernorm_after = _norm(cfg, param_dtype)
    init = cfg.layer_scale_init_value
    self.lambda_1 = nnx.Param(jnp.full((cfg.hidden_size,), init, param_dtype), axes=("embed",))
    self.lambda_2 = nnx.Param(jnp.full((cfg.hidden_size,), init, param_dtype), axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.lambda_1[...].astype(x.dtype) * self.attention(self.layernorm_before(x))
    return x + self.lambda_2[...].astype(x.dtype) * self.mlp(self.layernorm_after(x))


class InternViTEncoder(nnx.Module):

  def __init__(self, cfg: InternViTConfig, *, attention_impl: str, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.layer = nnx.List(
        [
            InternViTLayer(cfg, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(cfg.num_hidden_layers)
        ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layer:
      x = layer(x)
    return x


class InternViT(nnx.Module):
  """transformers.InternVLVisionModel: (B, H, W, C) normalised pixels → (B, 1 + N_patches, D) last hidden."""

  def __init__(
      self,
      cfg: InternViTConfig,
      *,
      attention_impl: str = "auto",
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.cfg, self.dtype = cfg, dtype
    self.embeddings = InternViTEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = InternViTEncoder(cfg, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layernorm = (
        None
        if cfg.use_mean_pooling
        else layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    )

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.cfg.num_channels:
      raise ValueError(
          f"InternViT expects NHWC pixels (B, H, W, {self.cfg.num_channels}); got " f"{pixel_values.shape}"
      )
    x = self.encoder(self.embeddings(pixel_values.astype(self.dtype)))
    return x if self.layernorm is None else self.layernorm(x)
