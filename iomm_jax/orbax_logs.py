"""What Orbax logs that a user should not see, and the one line of ours that replaces it: its background threads'
tracebacks for a failed save (the save check re-raises them as one line), its note about items a reader did not ask
for, and its ERROR (with the file's content) for a step's unreadable `_CHECKPOINT_METADATA`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import jax

from iomm_jax import orphaned_reads


class _QuietOrbaxThreads(logging.Filter):
  """Drop Orbax's background-thread tracebacks for failed saves (check_save re-raises them as one line), and its
  warning that an item a reader did not ask for (the data iterator's state) has no handler."""

  def filter(self, record):
    if "orbax" in record.pathname and "was found in the checkpoint, but could not be restored" in record.getMessage():
      return False
    return not (record.exc_info and "orbax" in record.pathname and record.levelno >= logging.ERROR)


QUIET_ORBAX = _QuietOrbaxThreads()


def quiet() -> None:
  """From now on, what a failed Orbax save or read leaves is not reported: its threads' tracebacks (QUIET_ORBAX) and
  the reports of the reads or writes it abandoned (orphaned_reads); the caller's own message is the one line."""
  logging.getLogger("absl").addFilter(QUIET_ORBAX)  # the same filter object: adding it again is a no-op
  orphaned_reads.install()


STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's per-step file: item handler names and timestamps, no weights


class _UnreadableStepMetadata(logging.Filter):
  """Catches Orbax's ERROR for a step's unreadable `_CHECKPOINT_METADATA` under `directory` (not JSON, or not
  readable), which it then does without: the step still lists (by the folder's time) and restores from its items.
  Each file is kept in `found`, for its caller's one line."""

  _MESSAGES = ("Failed to json parse Metadata file", "Failed to read Metadata file")

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory
    self.found: list[str] = []

  def filter(self, record):
    msg = record.msg if isinstance(record.msg, str) else ""
    if not msg.startswith(self._MESSAGES) or not record.args:
      return True
    path = str(record.args[0])
    if os.path.basename(path) != STEP_METADATA or os.path.dirname(os.path.dirname(path)) != self.directory:
      return True
    if path not in self.found:
      self.found.append(path)
    return False


class StepMetadataNotes:
  """Around the Orbax calls of one checkpoint reader or writer (`with notes.reading(): ...`): a step whose
  `_CHECKPOINT_METADATA` Orbax cannot read is one warning line of ours, once per file, instead of the absl ERROR
  (file content included) that Orbax logs each time it reads the file."""

  def __init__(self, directory: str):
    self.directory = directory
    self.reported: set[str] = set()

  @contextlib.contextmanager
  def reading(self):
    catch = _UnreadableStepMetadata(self.directory)
    logger = logging.getLogger("absl")
    logger.addFilter(catch)
    try:
      yield
    finally:
      logger.removeFilter(catch)
      for path in catch.found:
        if path not in self.reported:
          self.reported.add(path)
          self.warn(path)

  def warn(self, path: str) -> None:
    if jax.process_index() != 0:
      return
    step = os.path.basename(os.path.dirname(path))
    print(
        f"warning: checkpoint {step} in {self.directory}: Orbax's step metadata file {path} is not readable JSON "
        "(damaged); it holds no weights, so the step is read from its items without it",
        file=sys.stderr,
        flush=True,
    )
