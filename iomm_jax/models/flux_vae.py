"""The FLUX autoencoder: a port of `diffusers.AutoencoderKL` (Encoder/Decoder of ResnetBlock2D, GroupNorm, SiLU).

NHWC throughout. Attribute names follow diffusers' module tree, so our parameter paths equal the
AutoencoderKL state-dict keys up to `kernel`↔`weight` (`encoder.down_blocks.0.resnets.0.norm1.weight`,
`encoder.mid_block.attentions.0.to_q.kernel`, ...); `iomm_jax.models.vae_keys` holds the table.
GroupNorm statistics and the attention softmax are fp32; convolutions run in `dtype`. The blocks are in
`flux_vae_blocks.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from iomm_jax.models.flux_vae_blocks import DownEncoderBlock2D, GroupNorm, UNetMidBlock2D, UpDecoderBlock2D, conv
from iomm_jax.models.layers import DType


@dataclasses.dataclass(frozen=True)
class FluxVAEConfig:
  """Mirrors diffusers' AutoencoderKL config; defaults are the FLUX.1 VAE (≈83.8M parameters)."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  latent_channels: int = 16
  norm_num_groups: int = 32
  sample_size: int = 1024  # carried for the round trip; unused by us
  scaling_factor: float = 0.3611
  shift_factor: float | None = 0.1159
  force_upcast: bool = True  # carried for the round trip; unused by us
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_add_attention: bool = True
  attention: str = "auto"  # ours, not diffusers': layers.ATTENTION_IMPLS (config.model.attention)

  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(
          f"FluxVAEConfig: down_block_types ({len(self.down_block_types)}), up_block_types "
          f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length"
      )
    bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
    bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
    if bad:
      raise ValueError(
          f"FluxVAEConfig: unsupported block types {bad}; only DownEncoderBlock2D / UpDecoderBlock2D "
          "(the FLUX/SD VAE layout) are ported"
      )
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"FluxVAEConfig.act_fn={self.act_fn!r} is not supported; the port implements 'silu'")
    bad_groups = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad_groups:
      raise ValueError(
          f"FluxVAEConfig: block_out_channels {bad_groups} are not divisible by "
          f"norm_num_groups={self.norm_num_groups}"
      )

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  # Fields of diffusers' AutoencoderKL.__init__ that we carry (everything but attention).
  _DIFFUSERS_FIELDS = (
      "in_channels",
      "out_channels",
      "down_block_types",
      "up_block_types",
      "block_out_channels",
      "layers_per_block",
      "act_fn",
      "latent_channels",
      "norm_num_groups",
      "sample_size",
      "scaling_factor",
      "shift_factor",
      "force_upcast",
      "use_quant_conv",
      "use_post_quant_conv",
      "mid_block_add_attention",
  )

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **overrides) -> "FluxVAEConfig":
    """diffusers AutoencoderKL config dict (config.json or `vae.config`) → FluxVAEConfig."""
    d = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    for k in ("latents_mean", "latents_std"):
      if d.pop(k, None) is not None:
        raise ValueError(
            f"vae config: {k} is set; per-channel latent statistics are not supported "
            "(the FLUX VAE uses scaling_factor/shift_factor)"
        )
    unknown = sorted(set(d) - set(cls._DIFFUSERS_FIELDS))
    if unknown:
      raise ValueError(
          f"vae config: unknown field(s) {unknown}; expected AutoencoderKL fields " f"{list(cls._DIFFUSERS_FIELDS)}"
      )
    for k in ("down_block_types", "up_block_types", "block_out_channels"):
      if k in d:
        d[k] = tuple(d[k])
    if isinstance(d.get("sample_size"), (list, tuple)):
      d["sample_size"] = int(d["sample_size"][0])
    return cls(**{**d, **overrides})

  def to_diffusers(self) -> dict[str, Any]:
    """Keyword arguments for `diffusers.AutoencoderKL(**...)`."""
    d = {k: getattr(self, k) for k in self._DIFFUSERS_FIELDS}
    for k in ("down_block_types", "up_block_types", "block_out_channels"):
      d[k] = list(d[k])
    return d


class Encoder(nnx.Module):
  """Image (B,H,W,in) → posterior moments (B,H/f,W/f,2·latent): [mean | logvar] on the channel axis."""

  def __init__(self, cfg: FluxVAEConfig, *, dtype: DType = None, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = conv(cfg.in_channels, ch[0], 3, padding=1, **kw)
    self.down_blocks = nnx.List(
        [
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, resample=i < len(ch) - 1, **kw)
            for i in range(len(ch))
        ]
    )
    self.mid_block = UNetMidBlock2D(
        ch[-1], g, add_attention=cfg.mid_block_add_attention, attn_implementation=cfg.attention, **kw
    )
    self.conv_norm_out = GroupNorm(g, ch[-1], param_dtype=param_dtype)
    self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, padding=1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent (B,h,w,latent) → image (B,h·f,w·f,out)."""

  def __init__(self, cfg: FluxVAEConfig, *, dtype: DType = None, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    self.conv_in = conv(cfg.latent_channels, ch[0], 3, padding=1, **kw)
    self.mid_block = UNetMidBlock2D(
        ch[0], g, add_attention=cfg.mid_block_add_attention, attn_implementation=cfg.attention, **kw
    )
    self.up_blocks = nnx.List(
        [
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, resample=i < len(ch) - 1, **kw)
            for i in range(len(ch))
        ]
    )
    self.conv_norm_out = GroupNorm(g, ch[-1], param_dtype=param_dtype)
    self.conv_out = conv(ch[-1], cfg.out_channels, 3, padding=1, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class FluxVAE(nnx.Module):
  """AutoencoderKL with the `Autoencoder` interface (see models/autoencoder.py); latents are normalised.

  `encode` returns (z − shift_factor)·scaling_factor in fp32, z the posterior mean (rng None) or a sample;
  `decode` undoes the normalisation and returns fp32 images, nominally in [-1, 1] (not clipped).
  """

  def __init__(
      self,
      cfg: FluxVAEConfig = FluxVAEConfig(),
      *,
      dtype: DType = jnp.float32,
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.cfg, self.dtype = cfg, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    lc = cfg.latent_channels
    self.quant_conv = conv(2 * lc, 2 * lc, 1, padding=0, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = conv(lc, lc, 1, padding=0, **kw) if cfg.use_post_quant_conv else None

  @property
  def latent_channels(self) -> int:
    return self.cfg.latent_channels

  @property
  def downsample(self) -> int:
    return self.cfg.downsample

  def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, logvar) of raw (un-normalised) latents, fp32; logvar clipped to [-30, 20] like diffusers."""
    if images.ndim != 4 or images.shape[-1] != self.cfg.in_channels:
      raise ValueError(f"FluxVAE.encode expects NHWC images (B, H, W, {self.cfg.in_channels}), got {images.shape}")
    h = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """Images (B,H,W,3) in [-1,1] → normalised latents (B,H/f,W/f,C); the mean if rng is None, else a sample."""
    mean, logvar = self.moments(images)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return (z - (self.cfg.shift_factor or 0.0)) * self.cfg.scaling_factor

  def decode(self, latents: jax.Array) -> jax.Array:
    """Normalised latents (B,h,w,C) → images (B,h·f,w·f,3), fp32, nominally in [-1, 1]."""
    if latents.ndim != 4 or latents.shape[-1] != self.cfg.latent_channels:
      raise ValueError(f"FluxVAE.decode expects latents (B, h, w, {self.cfg.latent_channels}), got {latents.shape}")
    z = latents.astype(jnp.float32) / self.cfg.scaling_factor + (self.cfg.shift_factor or 0.0)
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)
