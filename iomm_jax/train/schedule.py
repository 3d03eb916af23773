"""Training length: `train.num_steps`, or `train.epochs` passes over the run's dataset converted to steps."""

from __future__ import annotations

import math

from iomm_jax.config import ConfigError


def num_steps(train_cfg, dataset_size: int | None) -> int:
  """Optimizer updates for this run.

  With `train.epochs > 0` the length is epochs × dataset_size / global_batch (rounded up), so a fine-tune on a
  210K-image set at batch 256 runs 10 epochs whatever the resolution's batch is; the paper states fine-tuning in
  epochs (10), not steps. For recipe 'mix' the dataset is the captioned set (data.path); the image half is drawn
  from its own stream. `train.epochs = 0` keeps `train.num_steps`."""
  epochs = float(train_cfg.epochs)
  if epochs <= 0:
    return int(train_cfg.num_steps)
  if not dataset_size:
    raise ConfigError(
        f"config.train.epochs={epochs} needs a dataset of known size; this source reports none — "
        "set config.train.num_steps instead (and config.train.epochs=0)"
    )
  return max(1, math.ceil(epochs * int(dataset_size) / int(train_cfg.global_batch)))
