"""Load a local transformers InternVL3 checkpoint (e.g. OpenGVLab/InternVL3-2B-hf) into our `InternVL`.

The model is built abstractly (`nnx.eval_shape`, no memory), every checkpoint key is checked against it from
the safetensors headers first (missing / unexpected / mis-shaped → `KeyMismatchError`), then tensors are
streamed one at a time: key mapped by the MLLM key table, layout transform, dtype cast, and — when shardings
are given — `jax.device_put` onto the target sharding right away. No torch import on this path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from iomm_jax.models import internvl_keys
from iomm_jax.models.internvl_keys import EXPECTED_LAYOUT, MLLMCheckpointError, read_config  # noqa: F401 (re-exported)
from iomm_jax.weights import io
from iomm_jax.models.keymap import TRANSFORMS, KeyMismatchError, flatten_state
from iomm_jax.models.internvl import InternVL, InternVLConfig


def abstract_model(cfg: InternVLConfig, *, dtype=jnp.bfloat16, param_dtype=None) -> InternVL:
  """The model with ShapeDtypeStruct leaves (no parameter memory)."""
  return nnx.eval_shape(lambda: InternVL(cfg, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0)))


def _torch_to_ours_shape(tname: str, shape) -> tuple[int, ...]:
  """The shape a transform gives, without touching data (keymap transforms only permute axes)."""
  shape = tuple(shape)
  if tname == "linear":
    return shape[::-1]
  if tname == "conv":
    return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape
  return shape


def _sharding_lookup(shardings) -> Callable[[str, tuple[int, ...]], Any]:
  """Normalise the `shardings` argument to a function (dotted path, shape) → sharding or None."""
  if shardings is None:
    return lambda path, shape: None
  if callable(shardings) and not isinstance(shardings, Mapping):
    return shardings
  # nnx.State, a nested dict, or a flat {dotted path: sharding} dict
  flat = flatten_state(shardings)

  def lookup(path, shape):
    if path not in flat:
      raise KeyError(f"load_internvl: no sharding given for parameter {path!r}")
    return flat[path]

  return lookup


def load_internvl(
    path: str | Path,
    *,
    dtype=jnp.bfloat16,
    compute_dtype=None,
    shardings=None,
    return_split: bool = False,
    **config_overrides,
):
  """Load DIR (config.json + safetensors) into an `InternVL`.

  dtype: parameter dtype (bf16 or fp32); compute_dtype: matmul dtype (default = dtype).
  shardings: None; a callable (dotted path, shape) → jax.sharding.Sharding; or an nnx.State / {dotted path:
    sharding} mapping matching the model state. Each tensor is placed on its sharding as soon as it is read.
  return_split: return (graphdef, state) instead of the merged model.
  config_overrides: top-level InternVLConfig fields (remat='full', attention='cudnn', with_lm_head=True).
  """
  cfg = read_config(path, **config_overrides)
  try:
    io.safetensors_files(path)
  except io.CheckpointNotFoundError as e:
    raise MLLMCheckpointError(f"{e}. {EXPECTED_LAYOUT}") from e
  model = abstract_model(cfg, dtype=compute_dtype or dtype, param_dtype=dtype)
  graphdef, abstract = nnx.split(model)
  table = internvl_keys.key_table(cfg.with_lm_head)

  # Plan: torch key → (our path, transform, our shape), checked against the headers before reading data.
  flat_abstract = nnx.to_flat_state(abstract)
  plan = {}
  for p, var in flat_abstract:
    dotted = ".".join(str(x) for x in p)
    shape = tuple(var.get_value().shape)
    key, tname = table.torch_key(dotted, len(shape))
    plan[key] = (dotted, tname, shape)
  specs, source_key = {}, {}
  for raw_key, (shape, _) in io.tensor_specs(path).items():
    key = internvl_keys.normalize_torch_key(raw_key)
    specs[key], source_key[key] = shape, raw_key
  missing = sorted(k for k in plan if k not in specs)
  unexpected = sorted(source_key[k] for k in specs if k not in plan and not table.ignored(k))
  misshaped = []
  for key, (dotted, tname, shape) in plan.items():
    if key in specs:
      if _torch_to_ours_shape(tname, specs[key]) != shape:
        misshaped.append((source_key[key], tuple(specs[key]), shape))
  if missing or unexpected or misshaped:
    raise KeyMismatchError("mllm", missing, unexpected, misshaped)

  sharding_of = _sharding_lookup(shardings)
  values = {}
  wanted = {source_key[k] for k in plan}
  for raw_key, arr in io.iter_tensors(path, keys=wanted):
    dotted, tname, shape = plan[internvl_keys.normalize_torch_key(raw_key)]
    arr = TRANSFORMS[tname][1](arr).astype(dtype, copy=False)  # per tensor: at most one extra copy
    sh = sharding_of(dotted, shape)
    values[dotted] = jax.device_put(arr, sh) if sh is not None else jnp.asarray(arr)
    del arr
  state = nnx.from_flat_state([(p, var.replace(values[".".join(str(x) for x in p)])) for p, var in flat_abstract])
  if return_split:
    return graphdef, state
  return nnx.merge(graphdef, state)
