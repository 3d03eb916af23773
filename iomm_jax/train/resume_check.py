"""What a rerun in a workdir that holds checkpoints may change: everything but the fields that fix the train state.

A rerun resumes from the newest checkpoint, so it must build the model and optimizer state that wrote it. `check`
runs before anything in the workdir is written or moved: it compares the new config with `<workdir>/config.json`
and stops with one line (ConfigError) naming each field that differs, its old and new value, and what to do.

Fixed on a resume: `train.stage` (the next stage is a new run started from this one's weights, `init.workdir`),
the DiT (`model.dit.kind`, every `model.dit.arch` field but the runtime ones below), the RQA (`model.rqa.*`), what
the DiT's output and input mean (`model.prediction`, `model.condition`: same shapes, but the saved weights were
trained for the other), `train.optimizer`, and whether EMA, REPA's head and gradient clipping are on (each adds or drops part of the state; their values may change), and, while records are held out
(`data.val_fraction`), which ones (`data.val_fraction`, `data.seed`). Free: everything else — `train.lr` and its
schedule, `num_steps` / `epochs`, time budgets, log / checkpoint / eval intervals, the data, the mesh, and
`model.dtype` (the compute dtype: parameters and optimizer state are fp32 whatever it is). A change this list
misses still cannot pass: the newest checkpoint's stored tree is compared with the run's before any restore
(`checkpoint.Checkpointer.check_fits`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from iomm_jax import config_validation
from iomm_jax.config import ConfigError
from iomm_jax.models import dit_families
from iomm_jax.train import restore
from iomm_jax import workdir_layout

# Compared value for value (a section: each of its fields).
FIXED_FIELDS = (*config_validation.WEIGHTS_MEANING, "model.rqa", "train.optimizer")
# Compared as on (> 0) or off: each switches a part of the train state (EMA weights, REPA's head, the clip's state).
SWITCH_FIELDS = ("train.ema_decay", "train.repa_weight", "train.grad_clip")
# Which records data.val_fraction holds out (a draw seeded by data.seed): changed on a resume, the run would train on
# records it held out so far and validate on records it trained on. Fixed while either config holds records out.
HOLDOUT_FIELDS = ("data.val_fraction", "data.seed")
# model.dit.arch fields that change how the DiT runs or was initialised, not its parameters: each family's config
# says which (RUNTIME_FIELDS). scan_layers: a scanned stack stores its blocks' parameters as the unrolled one does
# (tests/test_layer_stack.py).


def check(config, workdir: str) -> None:
  """Raise ConfigError when `config` would not fit the checkpoints in `workdir` (module docstring). Nothing to
  check without checkpoints (the run starts at step 0) or without config.json (the checkpoint check still runs)."""
  has_checkpoints = bool(workdir_layout.checkpoint_steps(workdir))
  if not has_checkpoints or not os.path.isfile(workdir_layout.path(workdir, workdir_layout.CONFIG)):
    return
  saved = restore.read_config(workdir)
  if saved.train.stage != config.train.stage:  # a new stage is a new run that starts from this one's weights
    raise ConfigError(
        f"--workdir={workdir} holds a {saved.train.stage!r} run's checkpoints and this config is train.stage="
        f"{config.train.stage!r}: train that stage in a new --workdir, starting from these weights with "
        f"--config.init.workdir={workdir}"
    )
  changes = changed_fields(saved, config)
  if not changes:
    return
  said = "; ".join(f"config.{f} was {_show(old, f)} there, {_show(new, f)} now" for f, old, new in changes)
  what = "fields that fix" if len(changes) > 1 else "a field that fixes"
  restore_flags = " ".join(f"--config.{f}={_flag(old)}" for f, old, _ in changes)
  raise ConfigError(
      f"--workdir={workdir} holds checkpoints this config cannot resume: {said} ({what} the saved weights, "
      "optimizer state or held-out records; lr, num_steps, time budgets and intervals may change). Train this config in a new --workdir, "
      f"or resume with the old value{'s' if len(changes) > 1 else ''}: {restore_flags}"
  )


def changed_fields(saved, config) -> list[tuple[str, Any, Any]]:
  """(dotted field, value in `saved`, value in `config`) for each field that fixes the train state and differs;
  both are configs (ConfigDicts), `saved` with the schema's defaults filled in (restore.read_config)."""
  old, new = _plain(saved), _plain(config)
  out = []
  for field in FIXED_FIELDS:
    a, b = _get(old, field), _get(new, field)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [(f"{field}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif a != b:
      out.append((field, a, b))
  for field in SWITCH_FIELDS:
    a, b = _get(old, field), _get(new, field)
    if (float(a or 0) > 0) != (float(b or 0) > 0):
      out.append((field, a, b))
  if any(float(_get(c, "data.val_fraction") or 0) > 0 for c in (old, new)):
    out += [(f, _get(old, f), _get(new, f)) for f in HOLDOUT_FIELDS if _get(old, f) != _get(new, f)]
  kind = _get(new, "model.dit.kind")
  if _get(old, "model.dit.kind") == kind:  # another family's fields mean other things: the kind says it all
    a, b = _dit_arch(old, kind), _dit_arch(new, kind)
    out += [(f"model.dit.arch.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  return out


def _dit_arch(config: dict, kind: str) -> dict:
  """model.dit.arch with the family's defaults for the fields it leaves out (so `num_layers=10` set or left to its
  default of 10 is the same DiT), without the runtime fields."""
  try:
    cls = dit_families.family(kind).config
  except ValueError:  # an unknown kind fails at build, naming it
    defaults, runtime = {}, ()
  else:
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING and f.init}
    runtime = cls.RUNTIME_FIELDS
  arch = _plain({**defaults, **(_get(config, "model.dit.arch") or {})})
  return {k: v for k, v in arch.items() if k not in runtime}


def _plain(node) -> Any:
  """A config (or part of one) as plain JSON values: tuples become lists, so saved and new values compare."""
  if hasattr(node, "to_dict"):
    node = node.to_dict()
  return json.loads(json.dumps(node, default=str))


def _get(node: dict, dotted: str):
  for part in dotted.split("."):
    node = node.get(part) if isinstance(node, dict) else None
  return node


def _show(value, field: str) -> str:
  text = repr(value)
  if field in SWITCH_FIELDS:
    text += " (on)" if float(value or 0) > 0 else " (off)"
  return text


def _flag(value) -> str:
  """A value as --config.<field>= takes it."""
  if isinstance(value, list):
    return repr(tuple(value))
  return str(value)
