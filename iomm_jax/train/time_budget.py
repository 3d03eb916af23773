"""A wall-clock budget for one training call: `train.time_budget_s` seconds, then the run ends as at its last step.

For a slot of known length (a preemptible queue's time limit, a demo that must finish in 15 minutes): the loop asks
`spent(step)` after every step; once it says yes, that step becomes the run's last of this call, so its metrics
row, sample grid and checkpoint are written exactly as at `train.num_steps`, and rerunning the same command resumes
there and trains on (another budget) towards `train.num_steps`. The learning-rate schedule is laid out over
`train.num_steps` whatever the budget: a constant rate after warm-up (the paper's) is unaffected by where the run
stops; a cosine decay is cut short.

The clock starts when the loop starts (after start-up and restore) and includes the first step's compilation. With
several processes process 0's clock decides, sent to all of them at every `check_every`-th step (one tiny
broadcast), so all stop at the same step.
"""

from __future__ import annotations

import time

import jax
import numpy as np


class TimeBudget:
  """`spent(step)`: True once `seconds` (> 0) of wall time have passed since construction; never when seconds is 0."""

  def __init__(self, seconds: float, *, check_every: int = 1, clock=None):
    self.seconds, self.check_every = float(seconds), max(1, int(check_every))
    self._clock = clock or time.monotonic
    self.start = self._clock()

  def elapsed(self) -> float:
    return self._clock() - self.start

  def spent(self, step: int) -> bool:
    """Whether the run should end at `step` (the same answer on every process)."""
    if self.seconds <= 0:
      return False
    if jax.process_count() == 1:
      return self.elapsed() >= self.seconds
    if step % self.check_every:
      return False
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(self.elapsed() >= self.seconds)))
