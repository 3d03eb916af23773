"""One component's weights as a directory: an Orbax checkpoint of its parameters plus `component.json`.

    DIR/component.json   {"format": "iomm_jax.component", "version": 1, "component": "transformer",
                          "kind": "mmdit", "config": {our config dataclass as JSON}, "torch_config": {...} | null,
                          "source": "...", "dtypes": [...]}
    DIR/params/          Orbax (StandardCheckpointer) of a nested dict: our dotted parameter path split on '.'

`python -m iomm_jax.convert to-jax` writes it; `--config.init.transformer=DIR` / `--config.init.rqa=DIR`
(weights/init_weights.py) and `to-torch` read it. Arrays keep their dtype (bf16 stays bf16).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from iomm_jax import orbax_logs, orphaned_reads, output_folder, restore_failure, tree_paths, workdir_layout
from iomm_jax import write_failures
from iomm_jax.weights.components import ConvertError

FORMAT = "iomm_jax.component"
VERSION = 1
META_FILE = "component.json"
PARAMS_DIR = "params"


def is_component_dir(path: str | Path) -> bool:
  return (Path(path) / META_FILE).is_file()


def save(
    dst: str | Path,
    *,
    component: str,
    kind: str,
    config: dict,
    params: Mapping[str, Any],
    torch_config: dict | None = None,
    source: str | None = None,
    overwrite: bool = False,
) -> Path:
  """Write `params` ({our dotted path: array}) and component.json to DST (a temporary sibling renamed into place,
  replacing, with `overwrite`, a component directory written before); returns DST."""
  import orbax.checkpoint as ocp

  dst = Path(dst).absolute()
  problem = output_folder.replace_problem(dst, flag="--dst", markers=(META_FILE,), overwrite=overwrite)
  if problem:
    raise ConvertError(problem)
  # Host numpy arrays (bf16 via ml_dtypes) are written as they are: no device copy of the whole model.
  tree = tree_paths.nest({k: np.asarray(jax.device_get(v)) for k, v in params.items()})
  orbax_logs.quiet()  # a failed write abandons TensorStore's coroutines and threads as a failed read does
  with write_failures.writing(dst), output_folder.replacing(dst) as tmp:  # a full disk: one OSError, no half folder
    try:
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / PARAMS_DIR, tree)
    except Exception:
      orphaned_reads.collect()  # end the writes it abandoned before the folder goes (once one landed after it)
      raise
    _write_meta(tmp, component, kind, config, torch_config, source, params)
  return dst


def _write_meta(dst: Path, component, kind, config, torch_config, source, params) -> None:
  meta = {
      "format": FORMAT,
      "version": VERSION,
      "component": component,
      "kind": kind,
      "config": config,
      "torch_config": torch_config,
      "source": source,
      "dtypes": sorted({str(np.dtype(getattr(v, "dtype", np.float32))) for v in params.values()}),
  }
  (dst / META_FILE).write_text(json.dumps(meta, indent=2))


def read_meta(src: str | Path, *, what: str = "--src") -> dict:
  """component.json of a component directory, validated."""
  p = Path(src)
  if not p.is_dir():
    raise ConvertError(
        f"{what}={p} is not a directory; expected a component directory written by "
        "`python -m iomm_jax.convert to-jax` (component.json + params/)"
    )
  f = p / META_FILE
  if not f.is_file() and workdir_layout.is_run_without_checkpoints(p):
    raise ConvertError(
        f"{what}={p} holds a run's {workdir_layout.CONFIG} but no {workdir_layout.CHECKPOINTS}/: a training workdir "
        "that has saved no checkpoint yet; train it to its first checkpoint (config.train.ckpt_every) first"
    )
  if not f.is_file() or not (p / PARAMS_DIR).is_dir():
    raise ConvertError(
        f"{what}={p} has no {META_FILE} and {PARAMS_DIR}/; it is not a component directory. {_to_jax_hint(p, what)}"
    )
  try:
    meta = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise ConvertError(f"{f} is not valid JSON ({e}); rewrite the directory with to-jax") from e
  if meta.get("format") != FORMAT:
    raise ConvertError(f"{f} is not an iomm_jax component file (format={meta.get('format')!r})")
  return meta


def _to_jax_hint(p: Path, what: str) -> str:
  """How to make the component directory `what` should name: to-jax into a NEW folder, never into `p` itself (a
  PyTorch model folder or a training workdir given by mistake); from `p` when it looks like a PyTorch folder."""
  src, dst, lead = "TORCH_PATH", "NEW_FOLDER", "Convert the PyTorch checkpoint into a new folder first"
  if workdir_layout.is_run(p):
    if what.startswith("config.init."):
      lead = "It is a training workdir: start from one with config.init.workdir, or convert a PyTorch checkpoint"
  elif (p / "config.json").is_file():  # a diffusers/transformers folder: suggest its converted copy beside it
    beside = Path(os.path.abspath(p))
    beside = beside.with_name(beside.name + "-jax")
    src, dst, lead = str(p), "NEW_FOLDER" if beside.exists() else str(beside), "Convert it into a new folder first"
  return f"{lead}: python -m iomm_jax.convert to-jax --component ... --src {src} --dst {dst}, then give {what}={dst}"


def shapes(src: str | Path, *, what: str = "") -> dict[str, tuple[tuple[int, ...], Any]]:
  """{dotted path: (shape, dtype)} from the Orbax metadata (no data read)."""
  import orbax.checkpoint as ocp

  orphaned_reads.install()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.metadata(Path(src).absolute() / PARAMS_DIR).item_metadata.tree
  except Exception as e:  # noqa: BLE001 — unreadable metadata: a damaged component directory
    problem = _damaged(src, e, what)
    del e
    orphaned_reads.collect()
    raise ConvertError(problem)
  return {k: (tuple(m.shape), m.dtype) for k, m in tree_paths.flatten(tree).items()}


def _damaged(src, error: BaseException, what: str = "") -> str:
  where = f"{what}={src}" if what else str(src)
  return (
      f"{where}: its weights ({Path(src) / PARAMS_DIR}) could not be read — {restore_failure.root_message(error)}; "
      "the directory is damaged: write it again with python -m iomm_jax.convert to-jax"
  )


def load(
    src: str | Path, *, target: Mapping[str, Any] | None = None, what: str = "--src"
) -> tuple[dict, dict[str, Any]]:
  """(component.json dict, {dotted path: array}).

  target: optional {dotted path: jax.ShapeDtypeStruct carrying a sharding}; arrays are then restored directly onto
  those shardings and cast to those dtypes (keys must equal the stored ones; see init_weights). Without it,
  numpy arrays in the stored dtypes come back.
  """
  import orbax.checkpoint as ocp

  meta = read_meta(src, what=what)  # `what`: the flag or field that named src, for the error
  path = Path(src).absolute() / PARAMS_DIR
  orphaned_reads.install()  # a damaged file is one message, not the tracebacks of the reads it ends
  try:
    with ocp.StandardCheckpointer() as ckptr:
      if target is None:
        tree = ckptr.restore(path)
        flat = {k: np.asarray(jax.device_get(v)) for k, v in tree_paths.flatten(tree).items()}
      else:
        flat = tree_paths.flatten(ckptr.restore(path, tree_paths.nest(dict(target))))
  except Exception as e:  # noqa: BLE001 — a truncated or missing array file: a damaged component directory
    problem = _damaged(src, e, what)
    del e
    orphaned_reads.collect()
    raise ConvertError(problem)
  return meta, flat
