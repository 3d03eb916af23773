"""Keep a failed Orbax read quiet after its one-line message: what its abandoned reads report is dropped.

One unreadable array (a truncated or missing checkpoint file) ends Orbax's event loop while TensorStore is still
reading the other arrays. Those reads go on reporting for seconds afterwards, through four channels: each completes
onto the closed loop (`RuntimeError: Event loop is closed`, sys.unraisablehook), each abandoned read coroutine
reports its own failure when it is collected (sys.unraisablehook) or that it was never awaited (a RuntimeWarning),
and asyncio logs each task or future whose exception nobody retrieved. A damaged tiny checkpoint printed over 22,000
lines of them after the message that already says which file is damaged. `install`, called by every checkpoint
reader before it reads (the first reports arrive before the failure reaches our code), drops those reports and only
those; every other report passes on unchanged. `collect` gathers the abandoned coroutines once a read has failed.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import warnings

_installed = False
_next_unraisablehook = sys.unraisablehook


def install() -> None:
  """Drop what abandoned Orbax reads report from now on. Cheap to call again: the hook is put back if something
  (a test runner) replaced it since."""
  global _installed, _next_unraisablehook  # noqa: PLW0603 — one set of filters per process
  if sys.unraisablehook is not _drop_orphaned:
    _next_unraisablehook = sys.unraisablehook
    sys.unraisablehook = _drop_orphaned
  if not _installed:
    _installed = True
    logging.getLogger("asyncio").addFilter(_DropUnretrieved())
    # This package awaits no coroutine of its own: one left never awaited is one a failed Orbax read abandoned.
    warnings.filterwarnings("ignore", message=r"coroutine '\w+' was never awaited", category=RuntimeWarning)


def collect() -> None:
  """After a failed read whose exception has been dropped: collect the coroutines it abandoned, quietly."""
  install()
  gc.collect()


def _drop_orphaned(unraisable) -> None:
  """sys.unraisablehook: drop what an abandoned read reports; pass on everything else."""
  if not is_orphaned_report(unraisable.object, unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
    _next_unraisablehook(unraisable)


def is_orphaned_report(obj, exc_type, exc_value, tb) -> bool:
  """True for an Orbax coroutine failing as it is collected, or for asyncio's `RuntimeError: Event loop is closed`
  raised in loop.call_soon_threadsafe (a read completing onto the loop a failed restore closed)."""
  code = getattr(obj, "cr_code", None)
  if code is not None and _is_orbax(code.co_filename):
    return True
  if exc_type is not RuntimeError or str(exc_value) != "Event loop is closed":
    return False
  names = set()
  while tb is not None:
    names.add(tb.tb_frame.f_code.co_name)
    tb = tb.tb_next
  return "call_soon_threadsafe" in names


class _DropUnretrieved(logging.Filter):
  """asyncio's 'Task/Future exception was never retrieved' for a checkpoint read (Orbax's tasks, TensorStore's
  futures); other asyncio messages pass."""

  def filter(self, record):
    msg = record.getMessage()
    if "exception was never retrieved" not in msg:
      return True
    return not (_is_orbax(msg) or "OCDBT" in msg or "TensorStore" in msg)


def _is_orbax(text: str) -> bool:
  return f"{os.sep}orbax{os.sep}" in text
