"""FLUX VAE ↔ diffusers AutoencoderKL key table and config mapping.

Our module tree is diffusers' (models/flux_vae.py), so the default rule covers every parameter: convolution
kernels HWIO↔OIHW, the mid-block attention Linears transposed, GroupNorm weights/biases as they are.
Checkpoints in BFL's original `ae.safetensors` naming (`encoder.down.0.block.0...`) must first be loaded
through diffusers (`AutoencoderKL.from_single_file`) and saved in diffusers layout.
"""

from __future__ import annotations

from typing import Any, Mapping

from iomm_jax.models import config_json
from iomm_jax.models.keymap import KeyTable
from iomm_jax.models.flux_vae import FluxVAEConfig

KEY_TABLE = KeyTable(component="vae", rules=[])

TORCH_CLASS = "AutoencoderKL"  # the diffusers class (a config.json's `_class_name`)

# How an AutoencoderKL config.json's fields are checked (models/config_json): diffusers writes [h, w] as the
# sample size of some VAEs; the latent shift may be 0 or negative.
JSON_TYPES = {"sample_size": int | tuple[int, ...]}
JSON_ZERO_OK = ("shift_factor",)


def check_config_json(config: Mapping[str, Any], where) -> None:
  """An AutoencoderKL config.json's fields against FluxVAEConfig (config_json.FieldTypeError naming `where`)."""
  config_json.check(
      (("", FluxVAEConfig),), config, where, types=JSON_TYPES, zero_ok=JSON_ZERO_OK, torch_class=TORCH_CLASS
  )


def config_from_diffusers(config: Mapping[str, Any], **overrides) -> FluxVAEConfig:
  """diffusers AutoencoderKL config → FluxVAEConfig (`overrides` set our extra fields, e.g. attention)."""
  return FluxVAEConfig.from_diffusers(config, **overrides)


def config_to_diffusers(cfg: FluxVAEConfig) -> dict[str, Any]:
  """FluxVAEConfig → keyword arguments of diffusers.AutoencoderKL."""
  return cfg.to_diffusers()
