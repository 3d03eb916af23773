"""What a checkpoint that failed to restore says to the user: the step, item and file, and the innermost cause."""

from __future__ import annotations

import re


def describe(directory: str, step: int, exc: BaseException) -> str:
  """One paragraph: which step, item and file failed to restore, and the underlying cause."""
  text = "\n".join(str(e) for e in chain(exc))
  item = re.search(rf"/{step}/(\w+)/", text)
  key = re.search(r'(?:Error reading|Metadata at) "([^"]+)"', text)
  where = re.search(r'local file "([^"]+)"', text)
  parts = [
      f"checkpoint {step} in {directory} could not be restored:",
      f"item '{item.group(1)}'" if item else "item unknown",
      f"(array '{key.group(1).split('/')[0]}' in {where.group(1)})"
      if key and where
      else (f"(file {where.group(1)})" if where else ""),
      f"— {root_message(exc)}.",
  ]
  return " ".join(p for p in parts if p)


def chain(exc: BaseException) -> list[BaseException]:
  """`exc` and its causes (explicit or implicit), outermost first; a context hidden by `raise … from None` is not
  one (json's JSONDecodeError hides a StopIteration whose message is a bare character offset)."""
  out = []
  while exc is not None and exc not in out:
    out.append(exc)
    exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
  return out


def root_message(exc: BaseException) -> str:
  """The innermost cause's first line, without TensorStore's spec dump."""
  root = chain(exc)[-1]
  msg = str(root).splitlines()[0] if str(root) else type(root).__name__
  msg = re.sub(r"\s*\[tensorstore_spec=.*", "", msg)
  return msg if len(msg) <= 400 else f"{msg[:200]} … {msg[-190:]}"  # the OS error is at the end
