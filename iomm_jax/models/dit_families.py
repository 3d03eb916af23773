"""The DiT families IOMM can train, each with its module, config and one common call: `predict(dit, x_t, t, h,
h_mask, masked, features=False) -> clean-latent-or-velocity latents (B, H, W, C)`, with `features=True` also
(image tokens (B, h, w, D) from inside the DiT, for representation alignment). The generator and the factory look a family up here
instead of branching on `config.model.dit.kind`; a new family is one entry."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from iomm_jax.models import latents as latent_ops
from iomm_jax.models.mmdit import MMDiT, MMDiTConfig
from iomm_jax.models.s3dit import S3DiT, S3DiTConfig


@dataclasses.dataclass(frozen=True)
class DiTFamily:
  kind: str  # the value of config.model.dit.kind
  module: type  # the nnx.Module: module(cfg, *, dtype, param_dtype, rngs)
  config: type  # its config dataclass (fields = the reference implementation's names)
  condition_fields: tuple[str, ...]  # config fields that must equal the MLLM width
  # (dit, x_t (B,H,W,C), t (B,), h (B,L,D), h_mask (B,L) bool, masked) -> (B,H,W,C); `masked`: the DiT's attention
  # honours h_mask (condition='all'); 'query' conditions have no padding, so attention then runs unmasked.
  # features=True: (latents, image tokens (B, h, w, feature_width(cfg)) from inside the DiT).
  predict: Callable[..., Any]
  feature_width: Callable[[Any], int]  # cfg -> the width of the tokens `predict(..., features=True)` returns
  patch: Callable[[Any], int]  # cfg -> the side of its square latent patches (the latent must divide into them)
  # (cfg, the autoencoder's latent channels) -> None when the DiT reads and predicts latents of that many channels,
  # else what is wrong, starting with the `model.dit.arch` field to change (the builder makes it one line)
  channel_mismatch: Callable[[Any, int], str | None]


def _mmdit_predict(dit: MMDiT, x_t, t, h, h_mask, masked: bool, features: bool = False):
  """FLUX: packed 2×2 tokens, the pooled vector = the condition's (masked) mean, RoPE ids."""
  _, height, width, channels = x_t.shape
  hm = h_mask.astype(jnp.float32)[..., None]
  pooled = (h.astype(jnp.float32) * hm).sum(1) / jnp.maximum(hm.sum(1), 1.0)
  out = dit(
      latent_ops.pack(x_t),
      h,
      pooled.astype(h.dtype),
      t,
      latent_ops.image_ids(height // 2, width // 2),
      latent_ops.text_ids(h.shape[1]),
      encoder_attention_mask=h_mask if masked else None,
      return_features=features,
  )
  if not features:
    return latent_ops.unpack(out, height, width, channels)
  out, feats = out
  return latent_ops.unpack(out, height, width, channels), feats.reshape(feats.shape[0], height // 2, width // 2, -1)


def _mmdit_channel_mismatch(cfg: MMDiTConfig, latent_channels: int) -> str | None:
  want = latent_channels * latent_ops.PATCH**2
  if cfg.in_channels != want:
    return (
        f"in_channels={cfg.in_channels} must be {want}: the autoencoder's {latent_channels} latent channels × the "
        f"{latent_ops.PATCH}×{latent_ops.PATCH} latent positions packed into one token"
    )
  if cfg.output_channels != want:
    return (
        f"out_channels={cfg.out_channels} with patch_size={cfg.patch_size} makes {cfg.output_channels} output "
        f"channels a token where the latent needs {want}; leave out_channels unset and patch_size 1"
    )
  return None


def _s3dit_channel_mismatch(cfg: S3DiTConfig, latent_channels: int) -> str | None:
  if cfg.in_channels != latent_channels:
    return f"in_channels={cfg.in_channels} must be the autoencoder's {latent_channels} latent channels"
  return None


def _s3dit_predict(dit: S3DiT, x_t, t, h, h_mask, masked: bool, features: bool = False):
  out = dit(x_t, t, h, h_mask if masked else jnp.ones(h.shape[:2], bool), return_features=features)
  if not features:
    return out
  out, feats = out
  p = dit.cfg.all_patch_size[0]
  return out, feats.reshape(feats.shape[0], x_t.shape[1] // p, x_t.shape[2] // p, -1)


DIT_FAMILIES: dict[str, DiTFamily] = {
    "mmdit": DiTFamily(
        "mmdit",
        MMDiT,
        MMDiTConfig,
        ("joint_attention_dim", "pooled_projection_dim"),
        _mmdit_predict,
        lambda cfg: cfg.inner_dim,
        lambda cfg: latent_ops.PATCH,
        _mmdit_channel_mismatch,
    ),
    "s3dit": DiTFamily(
        "s3dit",
        S3DiT,
        S3DiTConfig,
        ("cap_feat_dim",),
        _s3dit_predict,
        lambda cfg: cfg.dim,
        lambda cfg: cfg.all_patch_size[0],
        _s3dit_channel_mismatch,
    ),
}


def family(kind: str) -> DiTFamily:
  """The family of config.model.dit.kind, or one line naming the known kinds."""
  if kind not in DIT_FAMILIES:
    raise ValueError(f"config.model.dit.kind={kind!r}: expected one of {tuple(DIT_FAMILIES)}")
  return DIT_FAMILIES[kind]


def family_of(module: Any) -> DiTFamily:
  """The family of a built DiT module."""
  for fam in DIT_FAMILIES.values():
    if isinstance(module, fam.module):
      return fam
  raise TypeError(f"{type(module).__name__} is not a registered DiT family")
