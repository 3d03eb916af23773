"""How a command ends when the user stops it or a file system refuses it: one line and an exit status, no traceback.

Ctrl-C: the command's own cleanup (temporary output folders) has run as the interrupt unwound; the process then
exits with 130 at once, without the interpreter's teardown, which segfaulted when the interrupt came during an XLA
compile. An OSError that reached the top (a disk that filled, a folder made read-only while the command ran) is one
line naming the path and the system's reason, exit status 1. Training (`iomm_jax.main`) has its own handling: it
saves a checkpoint first.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def run(main: Callable[..., int | None], *args) -> int | None:
  """`main(*args)`'s result; Ctrl-C and an OSError become one line on stderr and their exit status."""
  try:
    return main(*args)
  except KeyboardInterrupt:
    print("stopped by Ctrl-C", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)
  except OSError as e:
    raise SystemExit(f"error: {describe(e)}") from None


def describe(e: OSError) -> str:
  """An OSError as the path it concerns and the system's reason, with what to do for the usual ones."""
  where = " → ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
  reason = e.strerror or str(e)
  text = f"{where}: {reason}" if where else reason
  hint = {28: "free some space, or write the output elsewhere", 30: "write the output to a writable folder"}
  return f"{text} ({hint[e.errno]})" if e.errno in hint else text
