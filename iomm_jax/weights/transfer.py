"""Moving one component's weights between a PyTorch-layout checkpoint and our flat {dotted path: array} form.

Both directions are strict (every missing, unexpected or mis-shaped key is listed in one KeyMismatchError,
checked from the safetensors headers before any tensor is read) and keep dtypes unless `dtype` is given.
No torch import here: `.pt/.bin` sources import torch inside `io` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from iomm_jax.weights import io
from iomm_jax.weights.components import ConvertError, Spec
from iomm_jax.models.keymap import TRANSFORMS, KeyMismatchError, to_torch

CAST_DTYPES = ("float32", "bfloat16")  # what the converter's --dtype casts to (dtype_names' names)


def cast(arr, dtype) -> np.ndarray:
  """`arr` in `dtype` when it is a floating array and dtype is set; otherwise unchanged (no copy)."""
  arr = np.asarray(arr)
  if dtype is not None and (arr.dtype == ml_dtypes.bfloat16 or np.issubdtype(arr.dtype, np.floating)):
    return arr.astype(dtype, copy=False)
  return arr


def torch_config_file(src: str | Path, config_path: str | Path | None = None) -> Path:
  """The config file read_torch_config reads: `config_path`, else SRC/config.json (directory) or the one beside a
  file."""
  if config_path:
    return Path(config_path)
  s = Path(src)
  return s / "config.json" if s.is_dir() else s.parent / "config.json"


def read_torch_config(src: str | Path, config_path: str | Path | None = None) -> dict | None:
  """The PyTorch config dict (a JSON object) from torch_config_file; None when there is no config beside SRC."""
  p = torch_config_file(src, config_path)
  if not p.is_file():
    if config_path:
      raise ConvertError(f"--config={p} does not exist; pass the JSON config (config.json) of the checkpoint")
    return None
  try:
    config = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ConvertError(f"{p} is not valid JSON ({e}); pass a diffusers/transformers config.json") from e
  if not isinstance(config, dict):
    raise ConvertError(
        f"{p} holds a JSON {type(config).__name__}, not an object of config fields; "
        "pass a diffusers/transformers config.json"
    )
  return config


def _ours_shape(tname: str, torch_shape) -> tuple[int, ...]:
  """The shape after the torch→ours transform, without touching data (transforms only permute axes)."""
  s = tuple(torch_shape)
  if tname == "linear":
    return s[::-1]
  if tname == "conv" and len(s) == 4:
    return (s[2], s[3], s[1], s[0])
  return s


def plan(spec: Spec, cfg, file_specs: Mapping[str, tuple]) -> dict[str, tuple[str, str, str]]:
  """{file key: (our path, transform, torch key)} after the strict check of names and shapes."""
  table = spec.table(cfg)
  by_norm = {}
  for raw in file_specs:
    norm = spec.from_file_key(raw)
    if norm in by_norm:
      raise ConvertError(f"{spec.kind}: checkpoint keys {by_norm[norm]!r} and {raw!r} are the same parameter")
    by_norm[norm] = raw
  wanted = {}
  for path, shape in spec.expected_shapes(cfg).items():
    key, tname = table.torch_key(path, len(shape))
    if key in wanted:
      raise ConvertError(
          f"{spec.kind}: our parameters {wanted[key][0]!r} and {path!r} both map to torch key "
          f"{key!r}; the key table ({spec.kind}_keys.KEY_TABLE) is wrong"
      )
    wanted[key] = (path, tname, tuple(shape))
  missing = sorted(k for k in wanted if k not in by_norm)
  unexpected = sorted(by_norm[k] for k in by_norm if k not in wanted and not table.ignored(k))
  misshaped, out = [], {}
  for key, (path, tname, shape) in wanted.items():
    if key not in by_norm:
      continue
    raw = by_norm[key]
    if _ours_shape(tname, file_specs[raw][0]) != shape:
      misshaped.append((raw, tuple(file_specs[raw][0]), shape))
    out[raw] = (path, tname, key)
  if missing or unexpected or misshaped:
    raise KeyMismatchError(spec.kind, missing, unexpected, misshaped)
  return out


def stream(spec: Spec, cfg, src: str | Path, *, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """(our dotted path, array in our layout and `dtype`) for every tensor of a PyTorch-layout checkpoint, one at a
  time, after the strict check of every name and shape against the headers (the one reader of torch checkpoints:
  the converter, `init.*`, the MLLM and the VAE of a training run all load through it)."""
  p = plan(spec, cfg, io.tensor_specs(src))
  for raw, arr in io.iter_tensors(src, keys=p):
    path, tname, _ = p[raw]
    yield path, cast(TRANSFORMS[tname][1](arr), dtype)


def torch_to_ours(spec: Spec, cfg, src: str | Path, *, dtype=None) -> dict[str, np.ndarray]:
  """Read a PyTorch-layout checkpoint into {our dotted path: numpy array}, one tensor at a time."""
  return dict(stream(spec, cfg, src, dtype=dtype))


def load_placed(spec: Spec, cfg, src: str | Path, *, dtype, sharding_of=None) -> dict[str, jax.Array]:
  """{our dotted path: device array}: each tensor is placed as soon as it is read (`sharding_of(path, shape)` →
  a sharding, or None for the default device), so host memory holds one tensor at a time."""
  out = {}
  for path, arr in stream(spec, cfg, src, dtype=dtype):
    sh = sharding_of(path, arr.shape) if sharding_of is not None else None
    out[path] = jax.device_put(arr, sh) if sh is not None else jnp.asarray(arr)
    del arr
  return out


def check_flat(spec: Spec, cfg, flat: Mapping[str, Any], where: str) -> None:
  """Strict check of our flat params against the model built from `cfg` (names and shapes)."""
  expected = spec.expected_shapes(cfg)
  missing = sorted(k for k in expected if k not in flat)
  unexpected = sorted(k for k in flat if k not in expected)
  misshaped = [
      (k, tuple(np.shape(flat[k])), expected[k])
      for k in sorted(expected)
      if k in flat and tuple(np.shape(flat[k])) != expected[k]
  ]
  if missing or unexpected or misshaped:
    raise KeyMismatchError(f"{spec.kind} ({where})", missing, unexpected, misshaped)


def ours_to_torch(spec: Spec, cfg, flat: Mapping[str, Any], *, dtype=None) -> dict[str, np.ndarray]:
  """{our dotted path: array} → {checkpoint file key: numpy array} in the reference's layout."""
  check_flat(spec, cfg, flat, "our parameters")
  out = {}
  for key, value in to_torch({k: np.asarray(jax.device_get(v)) for k, v in flat.items()}, spec.table(cfg)).items():
    fk = spec.to_file_key(key)
    if fk in out:
      raise ConvertError(f"{spec.kind}: two parameters map to checkpoint key {fk!r}; the key table is wrong")
    out[fk] = cast(value, dtype)
  return out


def write_torch_folder(
    spec: Spec,
    cfg,
    flat: Mapping[str, Any],
    dst: str | Path,
    *,
    torch_config: dict | None = None,
    dtype=None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
  """config.json (+ `_class_name`) and `{prefix}.safetensors` (sharded past max_shard_bytes) in DST."""
  tensors = ours_to_torch(spec, cfg, flat, dtype=dtype)
  out = Path(dst)
  out.mkdir(parents=True, exist_ok=True)
  config = dict(torch_config) if torch_config else spec.torch_config(cfg)
  if spec.kind != "mllm":
    config["_class_name"] = spec.torch_class
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  return io.write_safetensors(tensors, out, prefix=spec.weights_prefix, max_shard_bytes=max_shard_bytes)


def module_from_flat(spec: Spec, cfg, flat: Mapping[str, Any], *, dtype=jnp.float32) -> nnx.Module:
  """Our module (params in `dtype`) holding `flat`'s weights; built abstractly, so no random init runs."""
  check_flat(spec, cfg, flat, "our parameters")
  model = spec.abstract_model(cfg, param_dtype=dtype)
  state = nnx.state(model, nnx.Param)
  new = [
      (path, var.replace(jnp.asarray(np.asarray(flat[".".join(map(str, path))]), dtype)))
      for path, var in nnx.to_flat_state(state)
  ]
  nnx.update(model, nnx.from_flat_state(new))
  return model
