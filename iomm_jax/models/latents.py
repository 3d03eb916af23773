"""Packing of NHWC latents into 2×2-patch tokens for the MM-DiT, and their RoPE position ids.

The channel order of a packed token is diffusers FluxPipeline._pack_latents's: index c·4 + dy·2 + dx for latent
channel c and the position (dy, dx) inside the 2×2 patch, so weights converted from diffusers (x_embedder,
proj_out) work unchanged although our latents are NHWC and diffusers' are NCHW.
"""

from __future__ import annotations

import jax
import numpy as np

PATCH = 2  # the side of the MM-DiT's latent patches: pack / unpack fold 2×2 latent positions into one token


def pack(latents: jax.Array) -> jax.Array:
  """(B, H, W, C) → (B, (H/2)·(W/2), 4C), row-major over the 2×2 patches."""
  b, h, w, c = latents.shape
  if h % 2 or w % 2:
    raise ValueError(
        f"pack: latent height and width must be even for 2x2 patches, got H={h}, W={w}; "
        "choose an image size divisible by 16 (8x VAE downsampling x 2x2 patches)"
    )
  x = latents.reshape(b, h // 2, 2, w // 2, 2, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, H/2, W/2, C, dy, dx)
  return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: jax.Array, height: int, width: int, channels: int) -> jax.Array:
  """(B, (H/2)·(W/2), 4C) → (B, H, W, C); the inverse of `pack` for latent size H×W×C."""
  b, n, d = tokens.shape
  if height % 2 or width % 2:
    raise ValueError(f"unpack: latent height and width must be even, got H={height}, W={width}")
  if n != (height // 2) * (width // 2) or d != 4 * channels:
    raise ValueError(
        f"unpack: tokens {tokens.shape} do not fit a {height}x{width}x{channels} latent "
        f"(expected ({b}, {(height // 2) * (width // 2)}, {4 * channels}))"
    )
  x = tokens.reshape(b, height // 2, width // 2, channels, 2, 2)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, H/2, dy, W/2, dx, C)
  return x.reshape(b, height, width, channels)


def image_ids(h_tokens: int, w_tokens: int) -> np.ndarray:
  """(h·w, 3) float32 ids (0, row, col) in row-major order, as FluxPipeline._prepare_latent_image_ids.

  A host array: the ids depend only on the shape, so the DiT's RoPE tables built from them are constants of the
  compiled program (see MMDiT.__call__)."""
  rows, cols = np.meshgrid(np.arange(h_tokens, dtype=np.float32), np.arange(w_tokens, dtype=np.float32), indexing="ij")
  return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(h_tokens * w_tokens, 3)


def text_ids(length: int) -> np.ndarray:
  """(L, 3) float32 zeros: FLUX gives every text token position (0, 0, 0). A host array, as `image_ids`."""
  return np.zeros((length, 3), np.float32)
