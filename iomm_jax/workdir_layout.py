"""What a training workdir holds, by name: every writer and reader of a run folder takes its paths from here.

<workdir>/config.json          the resolved config the run saved once it built (sample, evaluators, warm starts)
<workdir>/checkpoints/<step>/   Orbax checkpoints
<workdir>/metrics.jsonl         one row per logged step
<workdir>/samples/              training-time grids, and `sample`'s default output
<workdir>/profile/              jax.profiler traces (train.profile_steps)
<workdir>/recon.json            eval_recon's report
<workdir>/eval_shapes.json, eval_shapes.png, eval_shapes/samples/   mini-GenEval's report, picture and samples
<workdir's parent>/xla_cache/   the persistent compile cache shared by the runs beside it (train.compile_cache_dir)
"""

from __future__ import annotations

import os

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
PROFILE = "profile"
RECON_REPORT = "recon.json"
EVAL_SHAPES = "eval_shapes"  # the report is EVAL_SHAPES + ".json", the picture + ".png", the samples a folder
COMPILE_CACHE = "xla_cache"


def path(workdir: str | os.PathLike, name: str) -> str:
  """`name` (one of this module's constants) inside `workdir`."""
  return os.path.join(os.fspath(workdir), name)


def is_run(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` holds a training run: its config and a checkpoints folder."""
  return os.path.isfile(path(workdir, CONFIG)) and os.path.isdir(path(workdir, CHECKPOINTS))
