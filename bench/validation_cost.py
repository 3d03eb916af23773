"""What in-run validation costs: one JSON line with the step time, a validation pass and a sample grid (medians after
the first, which compiles), and their share of training time at given eval_every / sample_every.

  python bench/validation_cost.py --config=configs/tiny.py --steps=60 --every=20

The run evaluates and samples every --every steps (to measure them); the share is computed for --eval_every and
--sample_every (the schema's defaults, 1000 and 5000). A share below 5% is the target.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench import _common  # noqa: E402
from iomm_jax import config as schema  # noqa: E402
from iomm_jax import config_validation  # noqa: E402
from iomm_jax import metrics  # noqa: E402
from iomm_jax.train import loop  # noqa: E402

_DEFAULTS = schema.base_config().train
_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "configs/<name>.py[:arg]")
_STEPS = flags.DEFINE_integer("steps", 60, "training steps of the bench run (2 × --every or more)", lower_bound=1)
_EVERY = flags.DEFINE_integer("every", 20, "evaluate and sample every this many steps in the bench run", lower_bound=1)
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", _DEFAULTS.eval_every, "the share is computed for this eval_every", lower_bound=1
)
_SAMPLE_EVERY = flags.DEFINE_integer("sample_every", _DEFAULTS.sample_every, "... and this sample_every", lower_bound=1)


def main(_) -> None:
  if _STEPS.value < 2 * _EVERY.value:  # the first evaluation, grid and logged window compile: medians need a second
    raise SystemExit(
        f"--steps={_STEPS.value} gives fewer than two evaluations at --every={_EVERY.value}; give --steps of "
        f"{2 * _EVERY.value} or more (or a smaller --every)"
    )
  c = _CONFIG.value
  config_validation.validate(c)
  every = _EVERY.value
  c.train.num_steps, c.train.log_every = _STEPS.value, every
  c.train.eval_every = c.train.sample_every = every
  c.train.ckpt_every, c.train.warmup_steps = _STEPS.value, 0
  with tempfile.TemporaryDirectory() as work:
    loop.train(c, work)
    rows = metrics.read_metrics(work)
  train_rows = [r for r in rows if "step_time_s" in r][1:]  # the first window holds the compile
  step_time = float(np.median([r["step_time_s"] for r in train_rows]))
  val_s = float(np.median([r["val_seconds"] for r in rows if "val_seconds" in r][1:]))
  grid_s = float(np.median([r["grid_seconds"] for r in rows if "grid_seconds" in r][1:]))
  share = (val_s / _EVAL_EVERY.value + grid_s / _SAMPLE_EVERY.value) / step_time
  print(
      json.dumps(
          {
              "bench": "validation_cost",
              "resolution": c.data.resolution,
              "global_batch": c.train.global_batch,
              "val_num": c.data.val_num,
              "eval_timesteps": len(c.train.eval_timesteps),
              "sample_steps": c.sample.steps,
              "step_time_s": round(step_time, 4),
              "val_seconds": round(val_s, 3),
              "grid_seconds": round(grid_s, 3),
              "eval_every": _EVAL_EVERY.value,
              "sample_every": _SAMPLE_EVERY.value,
              "share_of_training_time": round(share, 4),
          }
      )
  )


if __name__ == "__main__":
  _common.absl_run(main, _CONFIG)
