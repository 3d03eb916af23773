"""How a command ends when the user stops it or a file system refuses it: one line and an exit status, no traceback.

Ctrl-C or SIGTERM: the command's own cleanup (temporary output folders) has run as the interrupt unwound; the process
then exits with 130 (143 for SIGTERM) at once, without the interpreter's teardown, which segfaulted when the
interrupt came during an XLA compile. An OSError that reached the top (a disk that filled, a folder made read-only while the command ran) is one
line naming the path and the system's reason, exit status 1. Training (`iomm_jax.main`) has its own handling: it
saves a checkpoint first.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as if SIGTERM had ended it


class Terminated(BaseException):
  """Raised in the main thread by SIGTERM (a scheduler's or `kill`'s stop) while `run` runs a command, so the
  command's cleanup unwinds as for Ctrl-C."""


def _terminate(signum, frame):
  raise Terminated()


def run(main: Callable[..., int | None], *args) -> int | None:
  """`main(*args)`'s result; Ctrl-C, SIGTERM and an OSError become one line on stderr and their exit status."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _terminate)
  try:
    return main(*args)
  except KeyboardInterrupt:
    _stop("stopped by Ctrl-C", EXIT_INTERRUPTED)
  except Terminated:
    _stop("stopped by SIGTERM", EXIT_TERMINATED)
  except OSError as e:
    raise SystemExit(f"error: {describe(e)}") from None


def _stop(line: str, status: int) -> None:
  print(line, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def describe(e: OSError) -> str:
  """An OSError as the path it concerns and the system's reason, with what to do for the usual ones."""
  where = " → ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
  reason = e.strerror or str(e)
  text = f"{where}: {reason}" if where else reason
  hint = {28: "free some space, or write the output elsewhere", 30: "write the output to a writable folder"}
  return f"{text} ({hint[e.errno]})" if e.errno in hint else text
