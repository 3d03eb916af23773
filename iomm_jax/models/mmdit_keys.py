"""MM-DiT ↔ diffusers FluxTransformer2DModel: key table, config mapping and state-dict helpers.

Our module tree mirrors diffusers' exactly (models/mmdit.py, models/mmdit_blocks.py), so every key follows
keymap's default rule (`kernel` ↔ `weight`, transposed); the table holds no extra rules. diffusers'
FluxPosEmbed has no buffers, so nothing is ignored either.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iomm_jax.models import keymap
from iomm_jax.models.mmdit import MMDiT, MMDiTConfig

KEY_TABLE = keymap.KeyTable(component="mmdit", rules=[], ignore_torch=[])


def config_from_torch(config: Mapping[str, Any], **ours) -> MMDiTConfig:
  """diffusers config dict → MMDiTConfig (our extra fields, e.g. remat, via keyword)."""
  return MMDiTConfig.from_diffusers(dict(config), **ours)


def config_to_torch(cfg: MMDiTConfig) -> dict[str, Any]:
  """MMDiTConfig → diffusers config dict."""
  return cfg.to_diffusers()


def expected_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """{our dotted path: shape} of every parameter of `model` (works on an nnx.eval_shape'd model too)."""
  return {k: tuple(v.shape) for k, v in keymap.flatten_state(nnx.state(model, nnx.Param)).items()}


def load_torch_state(model: nnx.Module, state_dict: Mapping[str, np.ndarray], table=KEY_TABLE) -> None:
  """Copy a diffusers-layout numpy state dict into `model` in place (strict: raises KeyMismatchError)."""
  flat = keymap.to_jax(state_dict, table, expected_shapes(model))
  state = nnx.state(model, nnx.Param)
  new = []
  for path, var in nnx.to_flat_state(state):
    value = flat[".".join(str(p) for p in path)]
    new.append((path, var.replace(jnp.asarray(value, dtype=var.get_value().dtype))))
  nnx.update(model, nnx.from_flat_state(new))


def model_from_torch(
    cfg: MMDiTConfig,
    state_dict: Mapping[str, np.ndarray],
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    table=KEY_TABLE,
) -> MMDiT:
  """An MMDiT holding `state_dict`'s weights, built abstractly first (no random init is computed)."""
  model = nnx.eval_shape(lambda: MMDiT(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  load_torch_state(model, state_dict, table)
  return model


def torch_state(model: nnx.Module, table=KEY_TABLE) -> dict[str, np.ndarray]:
  """`model`'s parameters as a diffusers-layout numpy state dict."""
  flat = keymap.flatten_state(nnx.state(model, nnx.Param))
  return keymap.to_torch({k: np.asarray(jax.device_get(v)) for k, v in flat.items()}, table)
