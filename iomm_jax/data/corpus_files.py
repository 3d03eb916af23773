"""Reading a corpus as it lies on disk: image files under a folder (with sidecar ``.txt`` captions), a
``captions.jsonl``, a ``.jsonl``/``.csv``/``.tsv``/``.parquet`` table of (image, caption), and a Parquet image column
read row group by row group. Shared by the training sources (``sources``) and ``prepare``."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from iomm_jax import jsonl

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
)  # what PIL decodes (a GIF: its first frame)
TABLE_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")  # read_table's kinds (.json: JSON lines too)
CAPTIONS_FILE = "captions.jsonl"
_FILE_KEYS = ("file", "image", "path", "file_name")
_CAPTION_KEYS = ("caption", "text")


def caption_line(file: str, caption: str) -> str:
  """One line of a folder's CAPTIONS_FILE, in the keys its reader looks for first."""
  return json.dumps({_FILE_KEYS[0]: file, _CAPTION_KEYS[0]: caption}) + "\n"


def decode_text(value: Any) -> str | None:
  """A caption as stored (bytes or text) → str, or None when missing or blank.

  A list of captions (COCO-style datasets store several per image) gives its first non-blank one.
  """
  if value is None:
    return None
  if isinstance(value, (list, tuple, np.ndarray)):
    # str(list) would train on "['a cat', 'a cat on a mat']", brackets and quotes included.
    return next((t for t in (decode_text(v) for v in value) if t is not None), None)
  if isinstance(value, bytes):
    # A stray non-UTF-8 byte (a latin-1 sidecar, an old tar) must not cost the image its caption or the run.
    value = value.decode("utf-8", errors="replace")
  value = str(value).strip()  # a sidecar's trailing newline is not part of the caption a prompt will be compared with
  return value or None  # an empty caption is no caption


def list_images(root: str | os.PathLike) -> list[tuple[Path, Path | None]]:
  """Image files under ``root`` (recursive, sorted, hidden entries skipped, linked folders followed once) with their
  sidecar ``.txt`` if any."""
  root = Path(root)
  found = []
  visited = set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in visited:  # a link back up the tree, or one folder linked twice: read it once
      dirnames[:] = []
      continue
    visited.add(real)
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    names = set(filenames)
    for name in sorted(filenames):
      if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      txt = Path(name).stem + ".txt"
      found.append((Path(dirpath) / name, Path(dirpath) / txt if txt in names else None))
  found.sort(key=lambda p: p[0].relative_to(root).as_posix())
  return found


def read_captions_jsonl(path: Path) -> dict[str, str | None]:
  """``captions.jsonl`` lines ``{"file": relative path, "caption": text}`` → {relative path: caption}."""
  out = {}
  for n, row in jsonl.objects(path, example='{"file": "relative/path.png", "caption": "..."}'):
    key = next((row[k] for k in _FILE_KEYS if k in row), None)
    if key is None:
      raise ValueError(
          f"{path}:{n}: no image field (one of {_FILE_KEYS}); each line must be "
          '{"file": "relative/path.png", "caption": "..."}'
      )
    out[Path(key).as_posix()] = decode_text(next((row[k] for k in _CAPTION_KEYS if k in row), None))
  return out


def folder_captions(root: Path, images: list[tuple[Path, Path | None]]) -> dict[str, str | None]:
  """The captions of ``root/captions.jsonl`` (empty without one) keyed by the relative path of each image in
  ``images`` (``list_images(root)``); entries that name no listed image are counted in one note on stderr, with the
  first, since their captions would otherwise be lost unseen (a Windows ``\\`` in a path is read as ``/``)."""
  path = root / CAPTIONS_FILE
  if not path.exists():
    return {}
  captions = {key.replace("\\", "/"): caption for key, caption in read_captions_jsonl(path).items()}
  listed = {image.relative_to(root).as_posix() for image, _ in images}
  unmatched = sorted(set(captions) - listed)
  if unmatched:
    print(
        f"note: {len(unmatched)} of {len(captions)} entries of {path} name no image under {root} "
        f"(first: {unmatched[0]!r}); their captions are not used — the file field is the image's path relative "
        "to that folder",
        file=sys.stderr,
    )
  return captions


def note_missing_caption_column(path: Path, caption_key: str | None, columns, kind: str = "column") -> None:
  """One note on stderr when a table (a TFDS dataset: kind='feature') has no ``caption_key`` column: its images are
  read uncaptioned, which an image-only recipe wants and a pair recipe does not."""
  if caption_key and caption_key not in columns:
    print(
        f"note: {path} has no {caption_key!r} {kind} ({kind}s: {sorted(columns)}); its images are read without "
        f"captions — name the caption {kind} with --caption_key / data.caption_key",
        file=sys.stderr,
    )


class ParquetImages:
  """Random access to a Parquet image column holding encoded bytes or ``{bytes, path}`` structs (how HF datasets
  store an ``Image`` feature); one row group is read (and kept) at a time, so the table never sits in memory.
  A struct without bytes is read from its ``path`` (relative to the table's folder)."""

  def __init__(self, path: str | os.PathLike, column: str):
    import pyarrow.parquet as pq  # optional dependency, only for parquet input

    self.path, self.column = str(path), column
    meta = pq.ParquetFile(self.path).metadata
    self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    self._init_cache()

  def _init_cache(self) -> None:
    self._lock, self._file, self._group = threading.Lock(), None, (-1, [])

  def __getstate__(self):
    return {"path": self.path, "column": self.column, "starts": self.starts}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, i: int) -> bytes:
    g = int(np.searchsorted(self.starts, int(i), side="right")) - 1
    with self._lock:  # Grain's reader threads share this object
      if self._group[0] != g:
        if self._file is None:
          import pyarrow.parquet as pq

          self._file = pq.ParquetFile(self.path)
        self._group = (g, self._file.read_row_group(g, columns=[self.column]).column(0).to_pylist())
      value = self._group[1][int(i) - int(self.starts[g])]
    if isinstance(value, dict):
      if value.get("bytes"):
        return value["bytes"]
      if value.get("path"):
        with open(Path(self.path).parent / value["path"], "rb") as f:
          return f.read()
      raise ValueError(f"{self.path}: row {i}: {self.column!r} holds neither bytes nor a path")
    if not value:
      raise ValueError(f"{self.path}: row {i}: {self.column!r} is empty")
    return bytes(value)


def _read_parquet(path: Path, image_key: str, caption_key: str | None) -> list[tuple[str | int, str | None]]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  schema = pq.ParquetFile(path).schema_arrow
  if image_key not in schema.names:
    raise ValueError(
        f"{path} has no {image_key!r} column (columns: {schema.names}); pass the right name with "
        "--image_key / data.image_key"
    )
  kind = schema.field(image_key).type
  if pa.types.is_string(kind) or pa.types.is_large_string(kind):  # image paths
    return _table_rows(
        path, [(f"row {n}", r) for n, r in enumerate(pq.read_table(path).to_pylist(), 1)], image_key, caption_key
    )
  if not (
      pa.types.is_binary(kind)
      or pa.types.is_large_binary(kind)
      or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)
  ):
    raise ValueError(
        f"{path}: column {image_key!r} is {kind}; it must hold image paths (string), encoded bytes "
        "(binary) or {bytes, path} structs"
    )
  # encoded images: only the caption column is read now; the images row group by row group, when drawn
  n = pq.ParquetFile(path).metadata.num_rows
  note_missing_caption_column(path, caption_key, schema.names)
  if caption_key and caption_key in schema.names:
    captions = [decode_text(c) for c in pq.read_table(path, columns=[caption_key]).column(0).to_pylist()]
  else:
    captions = [None] * n
  return list(zip(range(n), captions))


def _table_rows(path: Path, rows: list[tuple[str, dict]], image_key: str, caption_key: str | None):
  """(image, caption) of each (where, row) pair; `where` ("line 3", "row 3") names the row in an error."""
  out = []
  if rows:
    note_missing_caption_column(path, caption_key, set().union(*(row for _, row in rows)))
  for where, row in rows:
    if image_key in row and row[image_key] in (None, ""):
      raise ValueError(f"{path}: {where}: {image_key!r} is empty; give the row an image or remove it")
    if image_key not in row:
      raise ValueError(
          f"{path}: {where} has no {image_key!r} column/field (columns: {sorted(row)}); "
          "pass the right name with --image_key / data.image_key"
      )
    out.append((str(row[image_key]), decode_text(row.get(caption_key)) if caption_key else None))
  return out


def read_table(
    path: str | os.PathLike, image_key: str = "image", caption_key: str | None = "caption"
) -> list[tuple[str | int, str | None]]:
  """Rows (image, caption) of a .jsonl/.json, .csv/.tsv or .parquet table. ``image`` is the path as written, or,
  for a Parquet column of encoded bytes / ``{bytes, path}`` structs, the row number (read with ParquetImages)."""
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".json"):
    example = json.dumps({image_key: "relative/path.png", **({caption_key: "..."} if caption_key else {})})
    rows = [(f"line {n}", row) for n, row in jsonl.objects(path, example=example)]  # the example shows the keys read
  elif suffix in (".csv", ".tsv"):
    data = path.read_bytes()
    try:
      text = data.decode("utf-8-sig")  # -sig: a spreadsheet's byte-order mark would otherwise join the first column
    except UnicodeDecodeError as e:
      line = data.count(b"\n", 0, e.start) + 1
      raise ValueError(
          f"{path}: not UTF-8 text (byte {data[e.start]:#04x} on line {line}); save the table as UTF-8"
      ) from None
    try:  # row 1 is the header; data rows count from 2, as a spreadsheet shows them
      reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
      rows = [(f"row {n}", row) for n, row in enumerate(reader, 2)]
    except csv.Error as e:
      raise ValueError(f"{path}: not a {suffix[1:].upper()} table ({e})") from None
  elif suffix == ".parquet":
    return _read_parquet(path, image_key, caption_key)
  else:
    raise ValueError(f"{path}: unknown table type {suffix!r}; use one of {', '.join(TABLE_EXTENSIONS)}")
  return _table_rows(path, rows, image_key, caption_key)
