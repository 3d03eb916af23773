"""Preemption: SIGTERM / SIGUSR1 ask the run to save at the next step boundary and exit with EXIT_PREEMPTED.

Ctrl-C (SIGINT) does the same for a person at the terminal, exiting with EXIT_INTERRUPTED (130, the shell's code for
it, so launchers do not requeue); a second Ctrl-C stops at once without saving, as Python's default does.

The handler only sets a flag. At every step boundary the processes agree on it (one tiny all-gather when there is
more than one process, so all of them see the request at the same step even when the signal reached only some),
then each saves that step's checkpoint and exits with EXIT_PREEMPTED, which the launchers requeue on
(launch/slurm/iomm.sbatch, launch/k8s/jobset.yaml).
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: "try again later"; launchers requeue on it
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C'd command
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
  """Raised by the loop after the preemption checkpoint is saved; main exits with EXIT_PREEMPTED."""

  def __init__(self, step: int, signame: str):
    self.exit_code = EXIT_INTERRUPTED if signame == "SIGINT" else EXIT_PREEMPTED
    what = "interrupted by Ctrl-C (SIGINT)" if signame == "SIGINT" else f"preempted by {signame}"
    super().__init__(
        f"{what}: saved the checkpoint at step {step}; exiting with status {self.exit_code} (rerun the same "
        "command to resume)"
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
    if signum == signal.SIGINT:  # the next Ctrl-C raises KeyboardInterrupt: a way out if the save itself hangs
      signal.signal(signal.SIGINT, signal.default_int_handler)
      os.write(2, b"\nCtrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again: stop now)\n")

  def install(self) -> "PreemptionWatch":
    for sig in SIGNALS:
      if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
        continue  # started in the background by a non-interactive shell: Ctrl-C is not meant for it
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
