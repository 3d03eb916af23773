"""Load a training workdir for inference: its resolved config, the frozen weights and the latest parameters."""

from __future__ import annotations

import os
import sys

import jax
import ml_collections

from iomm_jax import config as config_lib
from iomm_jax import config_validation
from iomm_jax import parallel
from iomm_jax.train import builder, checkpoint, checkpoint_weights
from iomm_jax.train.user_errors import USER_ERRORS
from iomm_jax import workdir_layout

SavedConfigError = workdir_layout.SavedConfigError  # config.json is not JSON: one line naming file and position


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved at start (`<workdir>/config.json`); a missing or unreadable file exits with one
  line naming it (SystemExit, status 1)."""
  path = workdir_layout.path(workdir, workdir_layout.CONFIG)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise SystemExit(f"--workdir={workdir} is a file; give the folder of a run written by python -m iomm_jax.main")
  if not os.path.exists(path):
    raise SystemExit(f"{path} not found: --workdir must be a training workdir written by python -m iomm_jax.main")
  try:
    config = read_config(workdir)
  except SavedConfigError as e:
    raise SystemExit(f"error: {e}") from None
  # A field edited by hand to a value outside its list (a DiT kind that does not exist) is named here, not as a
  # traceback from deep in the build; types were checked as the file was read.
  for field, choices in config_validation.CHOICES.items():
    value = config_lib.get_field(config, field)
    if value not in choices:
      raise SystemExit(
          f"error: {path}: config.{field}={value!r} is not one of {choices} (edited by hand?); "
          f"{workdir_layout.config_repair_hint(workdir)}"
      )
  return config


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """`<workdir>/config.json` (which must exist) as a config: JSON lists as tuples, and fields added to the schema
  after the run started at their defaults, so older workdirs still load. Raises SavedConfigError."""
  saved = workdir_layout.read_config_json(workdir)
  if not isinstance(saved, dict):
    raise SavedConfigError(
        f"{workdir_layout.path(workdir, workdir_layout.CONFIG)} holds a JSON {type(saved).__name__}, not a run's "
        f"config (an object); {workdir_layout.config_repair_hint(workdir)}"
    )
  if not workdir_layout.is_run_config(saved):  # a model folder's config.json (the MLLM's, a converted DiT's)
    sections = ", ".join(sorted(workdir_layout.RUN_CONFIG_SECTIONS))
    raise SavedConfigError(
        f"{workdir_layout.path(workdir, workdir_layout.CONFIG)} is not a training run's config (it has no "
        f"{sections} sections: a model folder?); give the run's workdir, the folder `python -m iomm_jax.main "
        "--workdir` trained in"
    )
  defaults = config_lib.base_config().to_dict()
  wrong = _wrong_type(saved, defaults)
  if wrong:
    raise SavedConfigError(
        f"{workdir_layout.path(workdir, workdir_layout.CONFIG)}: {wrong}; {workdir_layout.config_repair_hint(workdir)}"
    )
  return ml_collections.ConfigDict(_with_defaults(_tuples(saved), defaults))


# The JSON values a schema default of each type can be read back from (a float field may hold an int, a tuple a list).
_JSON_KINDS = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (list, tuple), list: (list, tuple)}


def _wrong_type(saved, defaults, prefix: str = "") -> str:
  """The first field of `saved` whose JSON type cannot be the schema's (text for a number, a number for a switch,
  a list for a scalar), in words; '' when every field can."""
  if not isinstance(saved, dict):
    return ""
  for key, default in defaults.items():
    if key not in saved or default is None:
      continue
    value, field = saved[key], f"config.{prefix}{key}"
    if isinstance(default, dict):
      if default and not isinstance(value, dict):
        return f"{field} is {value!r}, where a section is expected"
      problem = _wrong_type(value, default, f"{prefix}{key}.") if default else ""
      if problem:
        return problem
      continue
    want = _JSON_KINDS.get(type(default))
    if want is None or value is None:
      continue
    if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
      return f"{field} is {value!r}, where the schema holds {type(default).__name__} values (default {default!r})"
  return ""


def _with_defaults(saved: dict, defaults: dict) -> dict:
  out = dict(saved)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and value and isinstance(out[key], dict):
      out[key] = _with_defaults(out[key], value)
  return out


def _tuples(node):
  """JSON lists back to tuples (configs use tuples for sequences such as mesh.rules and sample.prompts)."""
  if isinstance(node, dict):
    return {k: _tuples(v) for k, v in node.items()}
  if isinstance(node, list):
    return tuple(_tuples(v) for v in node)
  return node


class RunRestoreError(ValueError):
  """A workdir that cannot be loaded for inference: no checkpoint, no such step, or a file it names is missing."""


def restore_run(workdir: str, *, step: int | None = None, use_ema: bool | None = None, load_frozen: bool = True):
  """(run, params, step): the run built from the saved config and the checkpoint's (EMA) generator params; EMA
  when `use_ema` (None: the run's own `sample.use_ema`, as its training grids used) and the run keeps one.

  `load_frozen=False` builds the run without the frozen MLLM / autoencoder weights (an export needs only the DiT and
  the RQA). Raises RunRestoreError, one line naming what is wrong."""
  config = load_config(workdir)
  _fit_mesh(config, workdir)
  if not workdir_layout.checkpoint_steps(workdir):  # before the model is built (minutes for a real MLLM)
    raise _no_checkpoint(workdir)
  try:
    run = builder.build(config, load_frozen=load_frozen)
    reader = checkpoint_weights.WeightsReader(workdir)
    try:
      have = reader.steps()
      if not have:
        raise _no_checkpoint(workdir)
      if step is not None and step not in have:
        raise RunRestoreError(f"--step={step}: no such checkpoint under {reader.directory}; it has steps {have}")
      step = have[-1] if step is None else step
      if use_ema is None:
        use_ema = bool(config.sample.use_ema)
      stored = reader.stored(step)
      which = "ema_params" if use_ema and stored["ema_params"] else "params"
      # Only the weights are read: not the optimizer state (twice their size under Adam).
      abstract = checkpoint.abstract_with_shardings(run.abstract_state.params, run.param_shardings)
      # A config.json changed after the checkpoint was saved builds another model: one line, not Orbax's traceback.
      mismatch = reader.mismatch(abstract, stored[which])
      if mismatch:
        raise RunRestoreError(
            f"checkpoint {step} under {reader.directory} does not fit the model that "
            f"{workdir_layout.path(workdir, workdir_layout.CONFIG)} describes ({mismatch}): the config was changed "
            "after the checkpoint was saved; copy the config the checkpoint was saved with over it "
            f"({workdir_layout.checkpoint_config_file(reader.directory, step)})"
        )
      params = reader.restore(abstract, which, step)
    except checkpoint_weights.DamagedCheckpointError as e:
      reader.abandon()
      others = [s for s in have if s != step]
      hint = f"Load another with --step (it also has steps {others})." if others else "It has no other checkpoint."
      raise RunRestoreError(f"{e} {hint}") from None
    except BaseException:
      reader.abandon()  # without the 'Event loop is closed' tracebacks a failed Orbax read prints at exit
      raise
    reader.close()
  except USER_ERRORS as e:
    raise RunRestoreError(f"{e}{_relative_paths_hint(config, workdir)}") from None
  return run, params, step


def _no_checkpoint(workdir: str) -> RunRestoreError:
  folder = os.path.abspath(workdir_layout.path(workdir, workdir_layout.CHECKPOINTS))
  return RunRestoreError(f"no checkpoint under {folder}; train first (python -m iomm_jax.main --workdir={workdir})")


def _fit_mesh(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A run trained on another number of devices than this process sees (8 GPUs, sampled on 1) keeps its mesh where
  it fits; where it does not, the run is rebuilt data-parallel over the devices at hand (the checkpoint restores
  onto any mesh), with a note, since these apps take no --config.mesh flags."""
  try:
    parallel.mesh_shape(config.mesh, jax.device_count())
  except config_lib.ConfigError as e:
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1  # existing fields: a lock allows it
    print(f"note: {workdir}: its {e}; loading it data-parallel on {jax.device_count()} device(s)", file=sys.stderr)


def add_checkpoint_flags(parser, *, applies: str = "") -> None:
  """--step, --use-ema / --no-ema: which checkpoint and which of its weights an app loads (restore_run's `step`,
  `use_ema`; the names its messages tell users to use). `applies` prefixes the help where the flags apply to one kind
  of source only (e.g. 'workdir: ')."""
  parser.add_argument("--step", type=int, default=None, help=f"{applies}checkpoint step (default: the newest)")
  ema = parser.add_mutually_exclusive_group()  # both given: argparse's one line, not the last one silently winning
  ema.add_argument(
      "--use-ema",
      dest="use_ema",
      action="store_true",
      default=None,
      help=f"{applies}the EMA weights when the run keeps them (default: the run's config.sample.use_ema, as its "
      "training grids used)",
  )
  ema.add_argument("--no-ema", dest="use_ema", action="store_false", help=f"{applies}the raw weights")


def load_for_inference(workdir: str, *, step: int | None = None, use_ema: bool | None = None):
  """restore_run for the apps (sample, the evaluators): a RunRestoreError becomes one line and exit status 1."""
  try:
    return restore_run(workdir, step=step, use_ema=use_ema)
  except RunRestoreError as e:
    raise SystemExit(f"error: {e}") from None


def _relative_paths_hint(config, workdir: str) -> str:
  """For a workdir saved before runs wrote absolute paths: which of its paths are read from the current directory."""
  relative = config_lib.relative_paths(config)
  if not relative:
    return ""
  return (
      f" ({workdir_layout.path(workdir, workdir_layout.CONFIG)} names {', '.join(relative)} relative to the directory its training "
      "started in: run from that directory)"
  )
