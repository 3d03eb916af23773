"""A full disk (or another failed write) as one OSError, whichever library was writing.

array_record reports a failed write as RuntimeError("write() failed: …"), safetensors as SafetensorError("… I/O
error: … (os error 28)"), Orbax's TensorStore as ValueError("RESOURCE_EXHAUSTED: Error writing … [os_error_code='28']").
Around such a write, `writing(path)` re-raises them as OSError(errno, reason, path), which every command reports in
one line (`app_exit.describe`: the path, the system's reason, what to do)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from typing import Iterator

_ERRNO = re.compile(r"os[ _]error(?:_code)?[=: ]*'?(\d+)")
_WRITE_FAILED = (
    "write() failed",
    "Error writing",
    "Failed writing",
    "Error while serializing",
    "No space left on device",
)


def as_oserror(exc: BaseException, path: str | os.PathLike) -> OSError | None:
  """`exc` as an OSError about `path` when it reports a failed write; None when it is something else."""
  if isinstance(exc, OSError):
    return exc
  text = str(exc)
  if not any(s in text for s in _WRITE_FAILED):
    return None
  found = _ERRNO.search(text)
  code = int(found.group(1)) if found else (errno.ENOSPC if "No space left on device" in text else None)
  reason = os.strerror(code) if code else text.splitlines()[0]
  return OSError(code, reason, str(path))


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
  """Re-raise a library's report of a failed write inside the block as `as_oserror`'s OSError about `path`; an
  OSError that names no file (Pillow's full disk) is given `path`."""
  try:
    yield
  except OSError as e:
    if e.filename is None and e.errno is not None:
      raise OSError(e.errno, e.strerror, str(path)) from None
    raise
  except Exception as e:  # noqa: BLE001 — only what as_oserror recognises is translated; the rest goes on as it was
    err = as_oserror(e, path)
    if err is None or err is e:
      raise
    raise err from None
