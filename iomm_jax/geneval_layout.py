"""GenEval's sample folder layout and prompts files.

  DIR/<prompt index, 5 digits>/metadata.jsonl     the prompt's metadata object, one JSON line, every field kept
  DIR/<idx>/samples/<n, 4 digits>.png             one PNG per sample, at the model's resolution
  DIR/<idx>/grid.png                              the samples side by side

GenEval's evaluator reads every digit-named folder and every digit-named PNG in it. A prompts file is JSONL, one
GenEval metadata object per line with at least a string "prompt" (GenEval's `evaluation_metadata.jsonl`).
:class:`Writer` builds the folder under a temporary sibling name and renames it into place only when complete, so a
failed or killed run never leaves a half-written DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from iomm_jax import jsonl


class PromptsFileError(ValueError):
  """A prompts file line that is not a GenEval metadata object; the message names the file and line."""


def read_prompts(path: str | os.PathLike) -> list[dict]:
  """The metadata objects of a JSONL prompts file, in file order; blank lines are skipped."""
  out = []
  try:
    for lineno, obj in jsonl.objects(path, example='{"prompt": "a red circle"}'):
      if not isinstance(obj.get("prompt"), str):
        raise PromptsFileError(f'{path}:{lineno}: no string "prompt" field (keys: {sorted(obj)})')
      out.append(obj)
  except jsonl.JsonLinesError as e:
    raise PromptsFileError(str(e)) from None
  if not out:
    raise PromptsFileError(f"{path}: no prompts in the file")
  return out


def write_prompts(path: str | os.PathLike, metadata: list[dict]) -> Path:
  """Writes metadata objects as a JSONL prompts file (atomically)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.write_text("".join(json.dumps(m) + "\n" for m in metadata))
  os.replace(tmp, path)
  return path


def grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
  """(n, H, W, 3) uint8 → one row with white padding, as GenEval's grid.png."""
  n, h, w, _ = images.shape
  out = np.full((h + 2 * pad, n * (w + pad) + pad, 3), 255, np.uint8)
  for j, img in enumerate(images):
    out[pad : pad + h, pad + j * (w + pad) : pad + j * (w + pad) + w] = img
  return out


def _is_index(name: str) -> bool:
  return name.isdigit()


class Writer:
  """Writes a GenEval sample folder; use as a context manager (commits on success, discards on error).

  An existing `out_dir` is replaced at commit: its digit-named prompt folders go, anything else in it (reports,
  notes) is moved over into the new folder, so only sample folders are ever deleted.
  """

  def __init__(self, out_dir: str | os.PathLike):
    self.out_dir = Path(out_dir)
    if self.out_dir.exists() and not self.out_dir.is_dir():
      raise FileExistsError(f"{self.out_dir} exists and is not a folder")
    self.out_dir.parent.mkdir(parents=True, exist_ok=True)
    self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    self.tmp.mkdir()
    self.count = 0

  def add(self, index: int, metadata: dict, images: np.ndarray) -> Path:
    """Writes prompt `index`: its metadata (unchanged) and its uint8 (n, H, W, 3) samples."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be uint8 (n, H, W, 3), got {images.dtype} {images.shape}")
    folder = self.tmp / f"{index:05d}"
    (folder / "samples").mkdir(parents=True)
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    for n, img in enumerate(images):
      Image.fromarray(img).save(folder / "samples" / f"{n:04d}.png")
    Image.fromarray(grid(images)).save(folder / "grid.png")
    self.count += 1
    return self.out_dir / folder.name

  def commit(self) -> Path:
    old = None
    if self.out_dir.exists():
      for p in self.out_dir.iterdir():
        if not (_is_index(p.name) and p.is_dir()):
          os.rename(p, self.tmp / p.name)
      old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(self.out_dir, old)
    os.rename(self.tmp, self.out_dir)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return self.out_dir

  def discard(self) -> None:
    shutil.rmtree(self.tmp, ignore_errors=True)

  def __enter__(self) -> "Writer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
    else:
      self.discard()


def write(out_dir: str | os.PathLike, metadata: list[dict], images: list[np.ndarray]) -> Path:
  """The whole layout at once: prompt i (numbered in list order) gets metadata[i] and images[i] (n, H, W, 3)."""
  if len(metadata) != len(images):
    raise ValueError(f"{len(metadata)} metadata objects but {len(images)} image sets")
  with Writer(out_dir) as w:
    for i, (m, imgs) in enumerate(zip(metadata, images)):
      w.add(i, m, imgs)
  return Path(out_dir)


def read(out_dir: str | os.PathLike) -> list[tuple[int, dict, list[Path]]]:
  """(index, metadata, sample PNG paths) of every digit-named prompt folder, as GenEval's evaluator reads them."""
  out_dir = Path(out_dir)
  if not out_dir.is_dir():
    raise FileNotFoundError(f"{out_dir} is not a folder")
  out = []
  for folder in sorted(p for p in out_dir.iterdir() if p.is_dir() and _is_index(p.name)):
    meta_path = folder / "metadata.jsonl"
    metadata = next((obj for _, obj in jsonl.objects(meta_path)), None)  # a bad line raises naming it
    if metadata is None:
      raise ValueError(f"{meta_path}: no metadata line")
    samples = folder / "samples"
    pngs = sorted(p for p in samples.iterdir() if p.suffix == ".png" and p.stem.isdigit()) if samples.is_dir() else []
    out.append((int(folder.name), metadata, pngs))
  return out


def load_image(path: str | os.PathLike) -> np.ndarray:
  """A sample PNG as uint8 (H, W, 3); a file that is not a readable image raises ValueError naming it."""
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"), np.uint8)
  except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
    raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}); write the sample again") from None
