"""Load a local transformers InternVL3 checkpoint (e.g. OpenGVLab/InternVL3-2B-hf) into our `InternVL`.

The model is built abstractly (`nnx.eval_shape`, no memory); the weights come through the one streaming loader
(`weights.transfer.load_placed` with the MLLM's registry entry): every checkpoint key checked against the model from
the safetensors headers first (missing / unexpected / mis-shaped → `KeyMismatchError`), then one tensor at a time
mapped by the MLLM key table, transformed, cast and — when shardings are given — placed on its sharding right away.
No torch import on this path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from iomm_jax.models.internvl_keys import EXPECTED_LAYOUT, MLLMCheckpointError, read_config  # noqa: F401 (re-exported)
from iomm_jax.weights import components, io, transfer
from iomm_jax.models.keymap import KeyMismatchError, flatten_state
from iomm_jax.models.internvl import InternVL, InternVLConfig


def abstract_model(cfg: InternVLConfig, *, dtype=jnp.bfloat16, param_dtype=None) -> InternVL:
  """The model with ShapeDtypeStruct leaves (no parameter memory)."""
  return nnx.eval_shape(lambda: InternVL(cfg, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0)))


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
    io.safetensors_files(path, layout_help=EXPECTED_LAYOUT)
  except io.CheckpointNotFoundError as e:
    raise MLLMCheckpointError(str(e)) from None
  model = abstract_model(cfg, dtype=compute_dtype or dtype, param_dtype=dtype)
  graphdef, abstract = nnx.split(model)
  try:
    values = transfer.load_placed(
        components.spec("mllm"), cfg, path, dtype=dtype, sharding_of=_sharding_lookup(shardings)
    )
  except io.CheckpointUnreadableError as e:
    raise MLLMCheckpointError(str(e)) from None
  except KeyMismatchError as e:  # the folder disagrees with itself: say which folder, and what to do
    raise KeyMismatchError(
        f"mllm ({path})",
        e.missing,
        e.unexpected,
        e.misshaped,
        hint=f"  {Path(path) / 'config.json'} does not describe these weights (a field edited by hand, a tensor "
        "renamed, or files of two downloads mixed): download the folder again",
    ) from None
  state = nnx.from_flat_state(
      [(p, var.replace(values[".".join(str(x) for x in p)])) for p, var in nnx.to_flat_state(abstract)]
  )
  if return_split:
    return graphdef, state
  return nnx.merge(graphdef, state)
