"""Start training from converted weights: `--config.init.transformer=DIR` / `--config.init.rqa=DIR`.

DIR is a component directory written by `python -m iomm_jax.convert to-jax` (weights/orbax_io.py). Called by
`train.builder.Run.init_state`; the checkpoint's config must describe the same weights as the run's config
(runtime-only fields such as remat are ignored), and its arrays are restored straight onto the run's shardings
in the run's parameter dtype.
"""

from __future__ import annotations

from typing import Mapping

import jax

from iomm_jax.weights import components, orbax_io
from iomm_jax.models.keymap import KeyMismatchError
from iomm_jax.models import factory


class InitWeightsError(ValueError):
  """config.init.* names a directory that does not fit the run; the message names the field and the fix."""


# Where each architecture field of the run comes from, for the error message.
_RQA_FIELDS = {"dim": "the MLLM width (config.model.mllm)", "eps": "RQAConfig.eps (default)"}


def _tuples(tree, prefix=()):
  """(key tuple, leaf) pairs of a nested pure dict, keys as stored (ints stay ints)."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _tuples(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _set(tree: dict, keys: tuple, value) -> None:
  for k in keys[:-1]:
    tree = tree[k]
  tree[keys[-1]] = value


def _copy(tree):
  return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def load_into(field: str, path: str, kind: str, run_cfg, current, shardings, where: str, *, check_only: bool = False):
  """`current` (pure dict of arrays) replaced by DIR's weights on `shardings`, after the config/key checks;
  `check_only`: the checks alone (`current` may then hold ShapeDtypeStructs), returning None."""
  try:
    meta = orbax_io.read_meta(path, what=f"config.{field}")
  except components.ConvertError as e:
    raise InitWeightsError(str(e)) from e
  if meta.get("kind") != kind:
    raise InitWeightsError(
        f"config.{field}={path} holds a {meta.get('component')} of kind {meta.get('kind')!r}, but the run needs "
        f"a {kind!r} ({where}); convert the right checkpoint with to-jax --component "
        f"{components.spec(kind).component}"
    )
  spec = components.spec(kind)
  stored = spec.config_from_json(meta["config"])
  diffs = spec.config_diff(stored, run_cfg)
  if diffs:
    name, theirs, ours = diffs[0]
    origin = _RQA_FIELDS.get(name, f"config.model.rqa.{name}") if kind == "rqa" else f"config.model.dit.arch.{name}"
    more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
    raise InitWeightsError(
        f"config.{field}={path}: the checkpoint has {name}={theirs!r} but the run has {name}={ours!r} "
        f"({origin}){more}. Set the run's config to the checkpoint's (see {path}/{orbax_io.META_FILE}) or convert "
        "a checkpoint that matches the run."
    )

  leaves = dict(_tuples(current))
  dotted = {".".join(map(str, k)): k for k in leaves}
  try:
    stored_shapes = orbax_io.shapes(path, what=f"config.{field}")
  except components.ConvertError as e:
    raise InitWeightsError(str(e)) from None
  missing = sorted(k for k in dotted if k not in stored_shapes)
  unexpected = sorted(k for k in stored_shapes if k not in dotted)
  misshaped = [
      (k, stored_shapes[k][0], tuple(leaves[dotted[k]].shape))
      for k in sorted(dotted)
      if k in stored_shapes and stored_shapes[k][0] != tuple(leaves[dotted[k]].shape)
  ]
  if missing or unexpected or misshaped:
    raise KeyMismatchError(f"config.{field}={path}", missing, unexpected, misshaped)
  if check_only:
    return None
  sh = dict(_tuples(shardings))
  target = {d: jax.ShapeDtypeStruct(leaves[k].shape, leaves[k].dtype, sharding=sh[k]) for d, k in dotted.items()}
  try:
    _, flat = orbax_io.load(path, target=target, what=f"config.{field}")
  except components.ConvertError as e:
    raise InitWeightsError(str(e)) from None
  out = _copy(current)
  for d, k in dotted.items():
    _set(out, k, flat[d])
  return out


def check(config, abstract_params: dict) -> None:
  """What `apply` checks (the folders, their kinds, configs and array shapes), reading no array: training runs it
  before it writes anything in its workdir, so converted weights that do not fit leave the workdir empty."""
  _replace(config, abstract_params, None, check_only=True)


def apply(config, params: dict, param_shardings: dict) -> dict:
  """params with 'dit' replaced from config.init.transformer and 'rqa' from config.init.rqa (when set)."""
  return _replace(config, params, param_shardings, check_only=False)


def _replace(config, params: dict, param_shardings: dict | None, *, check_only: bool) -> dict:

  mcfg = factory.mllm_config(config)
  width = factory.mllm_width(mcfg)
  out = dict(params)
  if config.init.transformer:
    out["dit"] = load_into(
        "init.transformer",
        config.init.transformer,
        config.model.dit.kind,
        factory.dit_config(config, width),
        params["dit"],
        None if check_only else param_shardings["dit"],
        f"config.model.dit.kind={config.model.dit.kind!r}",
        check_only=check_only,
    )
  if config.init.rqa:
    out["rqa"] = load_into(
        "init.rqa",
        config.init.rqa,
        "rqa",
        factory.rqa_config(config, width),
        params["rqa"],
        None if check_only else param_shardings["rqa"],
        "config.model.rqa",
        check_only=check_only,
    )
  return out
