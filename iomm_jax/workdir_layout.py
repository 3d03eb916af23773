"""What a training workdir holds, by name: every writer and reader of a run folder takes its paths from here.

<workdir>/config.json          the resolved config the run saved once it built (sample, evaluators, warm starts)
<workdir>/checkpoints/<step>/   Orbax checkpoints: items state/ (train state), data/ (iterator), config/ (the config)
<workdir>/damaged_checkpoints/  checkpoints that failed to restore, moved aside (kept) by a resume
<workdir>/trainer.lock          held by the process training in the workdir
<workdir>/tensorboard/          TensorBoard event files (train.tensorboard)
<workdir>/metrics.jsonl         one row per logged step
<workdir>/samples/              training-time grids, and `sample`'s default output
<workdir>/profile/              jax.profiler traces (train.profile_steps)
<workdir>/recon.json            eval_recon's report
<workdir>/eval_shapes.json, eval_shapes.png, eval_shapes/samples/   mini-GenEval's report, picture and samples
<workdir's parent>/xla_cache/   the persistent compile cache shared by the runs beside it (train.compile_cache_dir)

`read_config_json` reads config.json for every reader (training's rerun, sample, the evaluators, warm starts): one
line naming the file and where its JSON breaks when it was cut short or edited by hand.
"""

from __future__ import annotations

import json
import os

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
PROFILE = "profile"
RECON_REPORT = "recon.json"
EVAL_SHAPES = "eval_shapes"  # the report is EVAL_SHAPES + ".json", the picture + ".png", the samples a folder
COMPILE_CACHE = "xla_cache"
DAMAGED_CHECKPOINTS = "damaged_checkpoints"
LOCK = "trainer.lock"
TENSORBOARD = "tensorboard"
# The Orbax items inside checkpoints/<step>/ (train/checkpoint.py writes them; checkpoint_weights reads STATE_ITEM).
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data", "config"


def path(workdir: str | os.PathLike, name: str) -> str:
  """`name` (one of this module's constants) inside `workdir`."""
  return os.path.join(os.fspath(workdir), name)


# The sections every run's config.json has, and a model folder's config.json (PyTorch, transformers) does not.
RUN_CONFIG_SECTIONS = frozenset({"model", "train", "data"})


def is_run_config(saved) -> bool:
  """Whether `saved` (config.json's JSON) is a training run's config rather than a model folder's."""
  return isinstance(saved, dict) and RUN_CONFIG_SECTIONS <= saved.keys()


def is_run(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` holds a training run: its config and a checkpoints folder."""
  return os.path.isfile(path(workdir, CONFIG)) and os.path.isdir(path(workdir, CHECKPOINTS))


def is_run_without_checkpoints(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` holds a training run's config.json (its model and train sections, unlike a PyTorch model
  folder's config.json) but no checkpoints folder yet."""
  if not os.path.isfile(path(workdir, CONFIG)) or os.path.isdir(path(workdir, CHECKPOINTS)):
    return False
  try:
    with open(path(workdir, CONFIG)) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return False
  return is_run_config(saved)


class SavedConfigError(ValueError):
  """A workdir's config.json cannot be read back: not JSON (cut short, edited by hand) or not an object. The message
  names the file, where the JSON breaks, and what to do."""


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The finished checkpoint steps of a workdir, from its folder names (Orbax writes a step under a temporary name
  and renames it when done)."""
  return steps_in(path(workdir, CHECKPOINTS))


def steps_in(checkpoints: str | os.PathLike) -> list[int]:
  """The finished steps in a checkpoints folder (none when it does not exist)."""
  if not os.path.isdir(checkpoints):
    return []
  return sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())


def checkpoint_config_file(checkpoints: str | os.PathLike, step: int) -> str:
  """The copy of the run's config that checkpoint `step` of a checkpoints folder keeps (Orbax's JSON item)."""
  return os.path.join(os.fspath(checkpoints), str(step), CONFIG_ITEM, "metadata")


def checkpoint_config(workdir: str | os.PathLike) -> str | None:
  """The copy of the run's config that its newest checkpoint holds (JSON), or None when there is none."""
  for step in reversed(checkpoint_steps(workdir)):
    copy = checkpoint_config_file(path(workdir, CHECKPOINTS), step)
    if os.path.isfile(copy):
      return os.path.abspath(copy)
  return None


def read_config_json(workdir: str | os.PathLike):
  """The JSON value of `<workdir>/config.json` (which must exist); SavedConfigError, one line with where the JSON
  breaks and what to do, when it is not JSON."""
  file = path(workdir, CONFIG)
  try:
    with open(file, "rb") as f:
      data = f.read()
  except IsADirectoryError:
    raise SavedConfigError(f"{file} is a folder, not the run's config; {config_repair_hint(workdir)}") from None
  try:
    text = data.decode("utf-8")
    return json.loads(text)
  except UnicodeDecodeError as e:
    where = f"not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})"
  except json.JSONDecodeError as e:  # a position at the very end: the file was cut short
    where = (
        "empty"
        if not text.strip()
        else f"not valid JSON at line {e.lineno} column {e.colno} (char {e.pos} of {len(text)}: {e.msg})"
    )
  raise SavedConfigError(f"{file} is {where}: cut short or edited by hand; {config_repair_hint(workdir)}")


def config_repair_hint(workdir: str | os.PathLike) -> str:
  """What to do about a workdir's config.json that cannot be read."""
  copy = checkpoint_config(workdir)
  if copy:
    return f"copy the config its newest checkpoint was saved with over it ({copy}), or restore it from a backup"
  return "restore it from a backup, or delete it (no checkpoint depends on it; training writes it again)"
