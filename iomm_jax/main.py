"""Training entry point.

  python -m iomm_jax.main --config=configs/tiny.py[:ARG] [--config.train.num_steps=100 ...] --workdir=runs/tiny

Rerunning the same command in the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags
from iomm_jax import app_exit, distributed
from iomm_jax.config_validation import run_flags_parser, validate
from iomm_jax.train import dry_run
from iomm_jax.train import loop, preemption, user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "compile the step for the configured mesh without allocating the "
    "model; print per-device memory and FLOPs, then exit",
)
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "stop after this many updates in this invocation", lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value> to override config fields")
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO

  try:  # first thing: every process must join before touching devices
    distributed.initialize_from_config(_CONFIG.value)
  except distributed.DistributedStartError as e:
    raise SystemExit(f"error: {e}") from None

  if not _DRY_RUN.value and not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  try:
    # A ConfigError is also what only the built run can check: the mesh against the devices, the batch split.
    with user_errors.as_one_line():
      validate(_CONFIG.value, needs_data=not _DRY_RUN.value)  # a dry run reads no data
      if _DRY_RUN.value:
        print(json.dumps(dry_run.report(_CONFIG.value)))
        return 0
      summary = loop.train(_CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value)
  except OSError as e:  # a write that failed outside a checkpoint (config.json, a sample grid): checkpoints are whole
    raise SystemExit(f"error: {app_exit.describe(e)}; then rerun the same command, which resumes") from None
  except preemption.Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  import jax

  if jax.process_index() == 0:
    print(json.dumps({"done": summary}))
  return 0


def run():
  app.run(main, flags_parser=run_flags_parser(_CONFIG))


if __name__ == "__main__":
  sys.exit(run())
