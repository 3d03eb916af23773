"""Reading and writing PyTorch-layout checkpoints, one tensor at a time.

Accepted sources (`path`):
  - a directory with `model.safetensors`, or sharded `*.safetensors` + `model.safetensors.index.json`
    (diffusers/transformers `save_pretrained` layouts; a diffusers `diffusion_pytorch_model*.safetensors`
    works too);
  - a single `.safetensors` file;
  - a `.pt` / `.pth` / `.bin` torch pickle (torch is imported only for these).
Tensors come back as numpy arrays in their stored dtype (bf16 as `ml_dtypes.bfloat16`), one at a time, so no
second full copy of the checkpoint is held in host memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class CheckpointNotFoundError(FileNotFoundError):
  """The path holds no checkpoint in a layout we read."""


class CheckpointUnreadableError(ValueError):
  """A file in a layout we read that cannot be parsed (truncated, not safetensors, not a torch pickle)."""


@contextlib.contextmanager
def _reading(path: Path):
  """Errors of the safetensors / torch readers become one CheckpointUnreadableError naming the file."""
  from safetensors import SafetensorError

  try:
    yield
  except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
    if isinstance(e, (CheckpointNotFoundError, CheckpointUnreadableError)):
      raise
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise CheckpointUnreadableError(
        f"{path} cannot be read as a checkpoint ({type(e).__name__}: {first}); it may be truncated or not the "
        "format its name says: download or export it again"
    ) from None


def _layout_help() -> str:
  return (
      "expected a directory with model.safetensors, or sharded *.safetensors plus their "
      "*.safetensors.index.json, or a single .safetensors / .pt / .bin file"
  )


def safetensors_files(path: str | os.PathLike, layout_help: str | None = None) -> list[Path]:
  """The safetensors files of a checkpoint path (index order for sharded directories). `layout_help` replaces the
  generic description of a checkpoint's layout in the errors (the MLLM names its -hf download)."""
  p = Path(path)
  layout = layout_help or _layout_help()
  if p.is_file():
    if p.suffix != ".safetensors":
      raise CheckpointNotFoundError(f"{p} is not a .safetensors file; {layout}")
    return [p]
  if not p.is_dir():
    raise CheckpointNotFoundError(f"{p} does not exist; {layout}")
  indexes = sorted(p.glob("*" + SAFETENSORS_INDEX_SUFFIX))
  if indexes:
    weight_map = json.loads(indexes[0].read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (p / f).is_file()]
    if missing:
      raise CheckpointNotFoundError(f"{indexes[0]} names shards that are not in {p}: {missing}")
    return [p / f for f in files]
  files = sorted(p.glob("*.safetensors"))
  if not files:
    torch_files = sorted(f.name for f in p.iterdir() if f.suffix in TORCH_SUFFIXES)
    found = f" (it holds {torch_files[0]}: this path reads safetensors only)" if torch_files else ""
    raise CheckpointNotFoundError(f"no *.safetensors in {p}{found}; {layout}")
  shards = [f.name for f in files if re.search(r"-\d+-of-\d+\.safetensors$", f.name)]
  if shards:  # which tensors each holds is the index's to say: guessing could mix two downloads
    raise CheckpointNotFoundError(
        f"{p} holds sharded safetensors ({shards[0]}, ...) but no *{SAFETENSORS_INDEX_SUFFIX}; copy the index file "
        "from the model's download into it"
    )
  return files


def _torch_file(path: str | os.PathLike) -> Path | None:
  p = Path(path)
  if p.is_file() and p.suffix in TORCH_SUFFIXES:
    return p
  if p.is_dir() and not list(p.glob("*.safetensors")):
    found = [f for f in sorted(p.iterdir()) if f.suffix in TORCH_SUFFIXES]
    if len(found) == 1:
      return found[0]
  return None


def tensor_specs(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
  """{key: (shape, dtype name)} without reading tensor data (safetensors headers only)."""
  tf = _torch_file(path)
  if tf is not None:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in _torch_load(tf).items()}
  from safetensors import safe_open

  out = {}
  for f in safetensors_files(path):
    with _reading(f), safe_open(str(f), framework="numpy") as h:
      for k in h.keys():
        s = h.get_slice(k)
        out[k] = (tuple(s.get_shape()), s.get_dtype())
  return out


def iter_tensors(path: str | os.PathLike, keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yield (key, numpy array) one tensor at a time; `keys` restricts which are read."""
  wanted = None if keys is None else set(keys)
  tf = _torch_file(path)
  if tf is not None:
    for k, v in _torch_load(tf).items():
      if wanted is None or k in wanted:
        yield k, _torch_to_numpy(v)
    return
  from safetensors import safe_open

  for f in safetensors_files(path):
    with _reading(f):
      handle = safe_open(str(f), framework="numpy")
    with handle as h:
      for k in h.keys():
        if wanted is None or k in wanted:
          with _reading(f):  # not around the yield: the consumer's own errors are not this file's
            tensor = h.get_tensor(k)
          yield k, tensor


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The whole checkpoint as {key: numpy array} (small models, tests)."""
  return dict(iter_tensors(path))


def _torch_load(path: Path):
  import torch  # only for .pt/.bin sources

  with _reading(path):
    sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
  if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
  return sd


def _torch_to_numpy(t) -> np.ndarray:
  import ml_dtypes
  import torch

  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def write_safetensors(
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
    prefix: str = "model",
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
  """Write tensors as `{prefix}.safetensors`, or shards `{prefix}-0000i-of-0000n.safetensors` plus
  `{prefix}.safetensors.index.json` when they exceed `max_shard_bytes`. Accepts a mapping or an iterator of
  (key, array) pairs; only one shard's worth of arrays is held at a time. Returns the written files."""
  from safetensors.numpy import save_file

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  meta = {"format": "pt", **(metadata or {})}
  tmp_files, weight_map, total = [], {}, 0
  shard, shard_bytes = {}, 0
  probe = out / f".mode-probe-{os.getpid()}"  # the mode a file written here gets (the umask), for the shards
  probe.touch()
  file_mode = probe.stat().st_mode & 0o777
  probe.unlink()

  def flush():
    nonlocal shard, shard_bytes
    if shard:
      f = out / f".{prefix}-part{len(tmp_files):05d}.safetensors.tmp"
      save_file(shard, str(f), metadata=meta)
      os.chmod(f, file_mode)  # safetensors writes 0600 whatever the umask: others could not read the export
      tmp_files.append((f, list(shard)))
    shard, shard_bytes = {}, 0

  for key, value in items:
    arr = np.ascontiguousarray(np.asarray(value))
    if key in weight_map or key in shard:
      raise ValueError(f"write_safetensors: duplicate key {key!r}")
    if shard and shard_bytes + arr.nbytes > max_shard_bytes:
      flush()
    shard[key] = arr
    shard_bytes += arr.nbytes
    total += arr.nbytes
    weight_map[key] = None
  flush()
  n = len(tmp_files)  # the final names need the part count, so each part is renamed only now (not atomic_file)
  written = []
  for i, (f, keys) in enumerate(tmp_files):
    name = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
    f.replace(out / name)
    written.append(out / name)
    for k in keys:
      weight_map[k] = name
  if n > 1:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / f"{prefix}{SAFETENSORS_INDEX_SUFFIX}").write_text(json.dumps(index, indent=2))
  return written
