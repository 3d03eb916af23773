"""RQA ↔ PyTorch (`convert.torch_rqa.TorchRQA`) key table and config mapping.

Everything follows the default rule except the fused attention input projection: ours is one Linear
`cross_attn.in_proj` with kernel (D, 3D), torch's nn.MultiheadAttention stores `in_proj_weight` (3D, D)
and `in_proj_bias` (3D,). The [q | k | v] order is the same on both sides, so a transpose suffices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from iomm_jax.models.keymap import KeyTable, Rule
from iomm_jax.models.rqa import RQAConfig

KEY_TABLE = KeyTable(
    component="rqa",
    rules=[
        Rule(r"(query_blocks\.\d+\.cross_attn)\.in_proj\.kernel", r"\1.in_proj_weight", "linear"),
        Rule(r"(query_blocks\.\d+\.cross_attn)\.in_proj\.bias", r"\1.in_proj_bias", "identity"),
    ],
)

_TORCH_FIELDS = ("dim", "num_queries", "num_heads", "mlp_ratio", "num_layers", "eps")


def config_from_torch(cfg: Mapping[str, Any], **overrides) -> RQAConfig:
  """TorchRQA's `config` dict → RQAConfig (`overrides` set our extra fields, e.g. attention)."""
  unknown = sorted(set(cfg) - set(_TORCH_FIELDS))
  if unknown:
    raise ValueError(f"rqa config: unknown field(s) {unknown}; expected a subset of {list(_TORCH_FIELDS)}")
  return RQAConfig(**{**dict(cfg), **overrides})


def config_to_torch(cfg: RQAConfig) -> dict[str, Any]:
  """RQAConfig → keyword arguments of TorchRQA."""
  d = dataclasses.asdict(cfg)
  return {k: d[k] for k in _TORCH_FIELDS}
