"""JSON Lines files (prompts files, caption tables, captions.jsonl): one object per line, errors that name the line."""

from __future__ import annotations

import json
import os
from typing import Iterator


class JsonLinesError(ValueError):
  """A JSON Lines file that cannot be read, or a line that is not one JSON object; the message names path:line."""


def objects(path: str | os.PathLike, example: str = "{...}") -> Iterator[tuple[int, dict]]:
  """(line number, object) for each non-blank line of `path`, in order. `example` shows a valid line in the error
  a bad line raises."""
  try:
    with open(path, encoding="utf-8-sig") as f:  # -sig: the byte-order mark a Windows editor writes is not JSON
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise JsonLinesError(f"{path}: cannot read the file ({e})") from None
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise JsonLinesError(f"{path}:{n}: not JSON ({e.msg}); each line must be an object such as {example}") from None
    if not isinstance(obj, dict):
      raise JsonLinesError(f"{path}:{n}: a JSON {type(obj).__name__}, not an object such as {example}")
    yield n, obj


def text(rows) -> str:
  """`rows` (JSON-serialisable objects) as a JSON Lines file's text: one per line, each line ended."""
  return "".join(json.dumps(r) + "\n" for r in rows)
