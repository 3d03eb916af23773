"""Preemption: SIGTERM / SIGUSR1 ask the run to save at the next step boundary and exit with EXIT_PREEMPTED.

The handler only sets a flag. At every step boundary the processes agree on it (one tiny all-gather when there is
more than one process, so all of them see the request at the same step even when the signal reached only some),
then each saves that step's checkpoint and exits with EXIT_PREEMPTED, which the launchers requeue on
(launch/slurm/iomm.sbatch, launch/k8s/jobset.yaml).
"""

from __future__ import annotations

import signal

import jax
import numpy as np

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: "try again later"; launchers requeue on it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
  """Raised by the loop after the preemption checkpoint is saved; main exits with EXIT_PREEMPTED."""

  def __init__(self, step: int, signame: str):
    super().__init__(
        f"preempted by {signame}: saved the checkpoint at step {step}; exiting with status "
        f"{EXIT_PREEMPTED} (rerun the same command to resume)"
    )
    self.step, self.signame = step, signame


class PreemptionWatch:
  """Installs the handlers (main thread only) and answers `requested()` identically on every process."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def install(self) -> "PreemptionWatch":
    for sig in SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread (e.g. a test calling train() from a thread): no handler
        pass
    return self

  def uninstall(self) -> None:
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)
    self._previous = {}

  def requested(self) -> bool:
    """True on every process once any process received a signal (collective when process_count > 1)."""
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(local))
    if np.any(flags) and self.received is None:
      self.received = "a peer's signal"
    return bool(np.any(flags))
