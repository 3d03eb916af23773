"""The autoencoder interface the DiT trains in, its pixel-space identity, and the factory.

Every autoencoder maps NHWC images in [-1, 1] to *normalised* NHWC latents and back:

    encode(images (B,H,W,3), *, rng=None) -> latents (B,H/f,W/f,C)   (posterior mean if rng is None, else a sample)
    decode(latents) -> images (B,H,W,3)                               (nominally in [-1, 1], not clipped)
    latent_channels: int   C
    downsample: int        f

`IdentityAutoencoder` is the pixel-space stand-in of the tiny config; `FluxVAE` (models/flux_vae.py) is the
FLUX.1 AutoencoderKL.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from iomm_jax.models.flux_vae import FluxVAE, FluxVAEConfig


@runtime_checkable
class Autoencoder(Protocol):
  """What the rest of iomm_jax needs from an autoencoder (structural: FluxVAE and IdentityAutoencoder conform)."""

  latent_channels: int
  downsample: int

  def encode(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    ...

  def decode(self, latents: jax.Array) -> jax.Array:
    ...


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, C) → (B, H/f, W/f, f·f·C): each f×f block of positions folded into channels (row, column, channel)."""
  b, h, w, c = x.shape
  f = factor
  x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x: jax.Array, factor: int) -> jax.Array:
  """Inverse of :func:`space_to_depth`: (B, h, w, f·f·C) → (B, h·f, w·f, C)."""
  b, h, w, ch = x.shape
  f = factor
  x = x.reshape(b, h, w, f, f, ch // (f * f)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * f, w * f, ch // (f * f))


class IdentityAutoencoder(nnx.Module):
  """Pixel space, no parameters (the tiny config's autoencoder): latent = space_to_depth(image·scale, factor).

  `factor` > 1 folds factor×factor pixel blocks into channels (lossless and exactly invertible), so a 32² image
  with factor 2 is a 16²×12 latent: 4× fewer DiT tokens, the same information.
  """

  def __init__(self, scale: float = 1.0, channels: int = 3, factor: int = 1):
    if scale == 0:
      raise ValueError("IdentityAutoencoder: scale must be non-zero (decode divides by it)")
    if factor < 1:
      raise ValueError(f"IdentityAutoencoder: factor={factor} must be >= 1")
    self.scale, self.channels, self.factor = float(scale), int(channels), int(factor)
    self.latent_channels, self.downsample = self.channels * self.factor**2, self.factor

  def encode(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """images (B,H,W,C) → space_to_depth(images·scale) (fp32); `rng` is accepted and unused."""
    del rng
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"IdentityAutoencoder.encode expects (B, H, W, {self.channels}), got {images.shape}")
    h, w, f = images.shape[1], images.shape[2], self.factor
    if h % f or w % f:
      raise ValueError(f"IdentityAutoencoder.encode: image size {h}x{w} is not divisible by factor {f}")
    return space_to_depth(images.astype(jnp.float32), f) * self.scale

  def decode(self, latents: jax.Array) -> jax.Array:
    """Inverse of encode: latents (B,h,w,C·f²) → images (B,h·f,w·f,C) (fp32)."""
    return depth_to_space(latents.astype(jnp.float32), self.factor) / self.scale


AUTOENCODERS = ("identity", "flux_vae")


def make_autoencoder(kind: str, **kwargs: Any) -> Autoencoder:
  """Build an autoencoder by name.

  'identity': kwargs `scale`, `channels`, `factor`.
  'flux_vae': kwargs `cfg` (FluxVAEConfig, a dict of its fields, or None for the FLUX.1 defaults), `dtype`,
  `param_dtype`, `rngs` (default nnx.Rngs(0); load real weights afterwards through convert.vae_keys).
  """
  if kind == "identity":
    return IdentityAutoencoder(**kwargs)
  if kind == "flux_vae":
    cfg = kwargs.pop("cfg", None)
    if cfg is None:
      cfg = FluxVAEConfig()
    elif isinstance(cfg, dict):
      cfg = FluxVAEConfig(**cfg)
    elif not isinstance(cfg, FluxVAEConfig):
      raise TypeError(f"make_autoencoder('flux_vae'): cfg must be a FluxVAEConfig, a dict or None, got {type(cfg)}")
    rngs = kwargs.pop("rngs", None) or nnx.Rngs(0)
    return FluxVAE(cfg, rngs=rngs, **kwargs)
  raise ValueError(f"unknown autoencoder kind {kind!r}; expected one of {AUTOENCODERS}")
