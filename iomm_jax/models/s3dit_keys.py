"""Key table and config mapping for the S3-DiT (diffusers `ZImageTransformer2DModel` state-dict layout).

`iomm_jax.models.s3dit` names every module after the diffusers tree (nn.Sequential / ModuleList indices
included, e.g. `t_embedder.mlp.2`, `attention.to_out.0`, `all_x_embedder.2-1`), so the default rule of
`keymap.KeyTable` covers every parameter: Linear `kernel` (in, out) ↔ `weight` (out, in), everything else
(RMSNorm weights, `x_pad_token`, `cap_pad_token`, biases) identity. The table has no special rules; a
checkpoint of the Omni variant (SigLIP branch) is rejected by `config_from_torch` and, key by key, by
`keymap.to_jax` as unexpected keys.
"""

from __future__ import annotations

from typing import Any, Mapping

from iomm_jax.models.keymap import KeyTable
from iomm_jax.models.s3dit import S3DiTConfig

KEY_TABLE = KeyTable(component="s3dit", rules=[], ignore_torch=[])


def config_from_torch(config: Mapping[str, Any], **ours) -> S3DiTConfig:
  """diffusers ZImageTransformer2DModel config dict → S3DiTConfig (`ours`: remat, attention)."""
  return S3DiTConfig.from_diffusers(config, **ours)


def config_to_torch(cfg: S3DiTConfig) -> dict[str, Any]:
  """S3DiTConfig → ZImageTransformer2DModel constructor kwargs."""
  return cfg.to_diffusers()
