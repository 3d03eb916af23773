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

  def encode(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array: ...

  def decode(self, latents: jax.Array) -> jax.Array: ...


class IdentityAutoencoder(nnx.Module):
  """Pixel space: latent = image·scale, downsample 1, no parameters (the tiny config's autoencoder)."""

  def __init__(self, scale: float = 1.0, channels: int = 3):
    if scale == 0:
      raise ValueError("IdentityAutoencoder: scale must be non-zero (decode divides by it)")
    self.scale, self.latent_channels, self.downsample = float(scale), int(channels), 1

  def encode(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """images (B,H,W,C) → images·scale (fp32); `rng` is accepted and unused (a deterministic 'posterior')."""
    del rng
    if images.ndim != 4 or images.shape[-1] != self.latent_channels:
      raise ValueError(f"IdentityAutoencoder.encode expects (B, H, W, {self.latent_channels}), got {images.shape}")
    return images.astype(jnp.float32) * self.scale

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents (B,H,W,C) → latents/scale (fp32)."""
    return latents.astype(jnp.float32) / self.scale


AUTOENCODERS = ("identity", "flux_vae")


def make_autoencoder(kind: str, **kwargs: Any) -> Autoencoder:
  """Build an autoencoder by name.

  'identity': kwargs `scale`, `channels`.
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
