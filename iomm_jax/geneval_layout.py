"""GenEval's sample folder layout and prompts files.

  DIR/<prompt index, 5 digits>/metadata.jsonl     the prompt's metadata object, one JSON line, every field kept
  DIR/<idx>/samples/<n, 4 digits>.png             one PNG per sample, at the model's resolution
  DIR/<idx>/grid.png                              the samples side by side

GenEval's evaluator reads every digit-named folder and every digit-named PNG in it. A prompts file is JSONL, one
GenEval metadata object per line with at least a string "prompt" (GenEval's `evaluation_metadata.jsonl`).
:class:`Writer` builds the folder under a temporary sibling name and renames it into place only when complete, so a
failed or killed run never leaves a half-written DIR. It replaces only its own earlier output (eval_shapes' reports
there, which scored the samples replaced, are dropped with them): a DIR that holds anything else (a digit-named folder
that is not a sample folder, such as a workdir's checkpoints/10, or any other file) is refused before anything is
sampled (:func:`check_out_dir`), so nothing the writer did not write is ever deleted.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from iomm_jax import jsonl, output_folder, workdir_layout, write_failures

PROMPTS_FILE = "prompts.jsonl"  # a prompt set written inside the sample folder it produced (eval_shapes)


class PromptsFileError(ValueError):
  """A prompts file line that is not a GenEval metadata object; the message names the file and line."""


class OutputPathError(ValueError):
  """An output path that cannot be written or would replace what this module did not write; the message names it."""


def read_prompts(path: str | os.PathLike) -> list[dict]:
  """The metadata objects of a JSONL prompts file, in file order; blank lines are skipped."""
  out = []
  try:
    for lineno, obj in jsonl.objects(path, example='{"prompt": "a red circle"}'):
      if "prompt" not in obj:
        raise PromptsFileError(f'{path}:{lineno}: no "prompt" field (keys: {sorted(obj)}); add the prompt text')
      if not isinstance(obj["prompt"], str):
        raise PromptsFileError(
            f'{path}:{lineno}: "prompt" must be a string (the prompt\'s text), not the '
            f'{type(obj["prompt"]).__name__} {json.dumps(obj["prompt"])[:80]}'
        )
      out.append(obj)
  except jsonl.JsonLinesError as e:
    raise PromptsFileError(str(e)) from None
  if not out:
    raise PromptsFileError(f"{path}: no prompts in the file")
  return out


def write_prompts(path: str | os.PathLike, metadata: list[dict]) -> Path:
  """Writes metadata objects as a JSONL prompts file (atomically: a failed write leaves no temporary file); a path
  that cannot be a file raises OutputPathError naming it."""
  path = Path(path)
  problem = output_folder.path_problem(path, folder=False)
  if problem:
    raise OutputPathError(problem)
  with write_failures.writing(path), output_folder.atomic_file(path) as tmp:  # a full disk names `path`
    tmp.write_text(jsonl.text(metadata))
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


METADATA_FILE, SAMPLES_DIR, GRID_FILE = "metadata.jsonl", "samples", "grid.png"  # a prompt folder's contents
_SAMPLE_FOLDER = {METADATA_FILE, SAMPLES_DIR, GRID_FILE}  # what Writer.add puts in a prompt folder
# What `eval_shapes --samples=DIR` writes into a sample folder it scores: part of that output, replaced with it (the
# scores of samples that are gone are dropped, not carried over beside new ones).
REPORT_FILES = (workdir_layout.EVAL_SHAPES + "*.json", workdir_layout.EVAL_SHAPES + "*.png")


def _foreign(folder: Path) -> str:
  """Why the digit-named `folder` is not a prompt folder as Writer.add writes it ('' when it is one)."""
  if not folder.is_dir():
    return "a file"
  names = {p.name for p in folder.iterdir()}
  if not ((folder / METADATA_FILE).is_file() and (folder / SAMPLES_DIR).is_dir()):
    return f"not a GenEval sample folder (no {METADATA_FILE} and {SAMPLES_DIR}/)"
  extra = sorted(names - _SAMPLE_FOLDER) + sorted(
      f"{SAMPLES_DIR}/{p.name}"
      for p in (folder / SAMPLES_DIR).iterdir()
      if not (p.suffix == ".png" and p.stem.isdigit())
  )
  return f"a sample folder holding other files too ({', '.join(extra[:3])})" if extra else ""


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
  return any(fnmatch.fnmatch(name, pat) for pat in patterns)


def check_out_dir(out_dir: str | os.PathLike, also_own: tuple[str, ...] = ()) -> None:
  """Raises OutputPathError (one line) unless `out_dir` can take a new sample folder: it is new, empty or holds only
  an earlier sample folder (digit-named prompt folders as Writer writes them, eval_shapes' REPORT_FILES, and top-level
  files matching one of the glob patterns `also_own`, which a caller writes beside them)."""
  also_own = tuple(also_own) + REPORT_FILES
  out_dir = Path(out_dir)
  problem = output_folder.path_problem(out_dir, folder=True, beside=True)
  if problem:
    raise OutputPathError(problem)
  if not out_dir.is_dir():
    return
  for p in sorted(out_dir.iterdir()):
    if _is_index(p.name):
      why = _foreign(p)
    elif p.is_file() and _matches(p.name, also_own):
      why = ""
    else:
      why = "not part of a sample folder"
    if why:
      raise OutputPathError(
          f"{out_dir} holds {p.name!r}, {why}; samples replace only an earlier sample output, so give a new or "
          "empty folder"
      )


class Writer:
  """Writes a GenEval sample folder; use as a context manager (commits on success, discards on error).

  An existing `out_dir` must hold only an earlier sample output (see check_out_dir; checked here, before any sample,
  and again at commit); it is replaced at commit. Its reports (REPORT_FILES) go with it; its `also_own` files are
  kept (linked into the new folder before the swap, so a kill at any point loses none) unless the new folder has one
  of that name. `reports`: files elsewhere that describe the samples replaced (a workdir's eval_shapes.json), removed
  just before the swap, so a kill after it leaves the new samples with no report rather than the old one.
  """

  def __init__(
      self, out_dir: str | os.PathLike, also_own: tuple[str, ...] = (), reports: tuple[str | os.PathLike, ...] = ()
  ):
    self.out_dir, self.also_own, self.reports = Path(out_dir), tuple(also_own), tuple(reports)
    output_folder.clear_leftovers(self.out_dir)  # what a killed writer of it left: put back or removed
    check_out_dir(self.out_dir, self.also_own)
    self.out_dir.parent.mkdir(parents=True, exist_ok=True)
    self.tmp = output_folder.sibling(self.out_dir, "tmp")
    self.tmp.mkdir()
    self.count = 0

  def write_prompts(self, metadata: list[dict]) -> Path:
    """Writes the prompt set (PROMPTS_FILE) into the folder, committed with the samples."""
    with write_failures.writing(self.out_dir / PROMPTS_FILE):
      (self.tmp / PROMPTS_FILE).write_text(jsonl.text(metadata))
    return self.out_dir / PROMPTS_FILE

  def add(self, index: int, metadata: dict, images: np.ndarray) -> Path:
    """Writes prompt `index`: its metadata (unchanged) and its uint8 (n, H, W, 3) samples."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be uint8 (n, H, W, 3), got {images.dtype} {images.shape}")
    folder = self.tmp / f"{index:05d}"
    with write_failures.writing(self.out_dir):  # a full disk names the folder asked for, not the file Pillow wrote
      (folder / SAMPLES_DIR).mkdir(parents=True)
      (folder / METADATA_FILE).write_text(json.dumps(metadata) + "\n")
      for n, img in enumerate(images):
        Image.fromarray(img).save(folder / SAMPLES_DIR / f"{n:04d}.png")
      Image.fromarray(grid(images)).save(folder / GRID_FILE)
    self.count += 1
    return self.out_dir / folder.name

  def commit(self) -> Path:
    if self.out_dir.exists():
      try:
        check_out_dir(self.out_dir, self.also_own)  # again: something may have been put there while sampling
      except OutputPathError as e:  # the samples are kept under a name the next writer does not tidy away
        kept = output_folder.sibling(self.out_dir, "kept")
        os.rename(self.tmp, kept)
        raise OutputPathError(f"{e} (this run's samples are kept in {kept})") from None
      for p in self.out_dir.iterdir():
        if _is_index(p.name) or _matches(p.name, REPORT_FILES) or (self.tmp / p.name).exists():
          continue  # the samples replaced, their reports, and the caller's files written anew
        try:  # the caller's own files (also_own): the old folder keeps them until the swap
          os.link(p, self.tmp / p.name)
        except OSError:
          shutil.copy2(p, self.tmp / p.name)
    for report in self.reports:
      Path(report).unlink(missing_ok=True)
    output_folder.swap_in(self.tmp, self.out_dir)
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


def write(
    out_dir: str | os.PathLike, metadata: list[dict], images: list[np.ndarray], also_own: tuple[str, ...] = ()
) -> Path:
  """The whole layout at once: prompt i (numbered in list order) gets metadata[i] and images[i] (n, H, W, 3)."""
  if len(metadata) != len(images):
    raise ValueError(f"{len(metadata)} metadata objects but {len(images)} image sets")
  with Writer(out_dir, also_own) as w:
    for i, (m, imgs) in enumerate(zip(metadata, images)):
      w.add(i, m, imgs)
  return Path(out_dir)


def read(out_dir: str | os.PathLike) -> list[tuple[int, dict, list[Path]]]:
  """(index, metadata, sample PNG paths) of every digit-named prompt folder, as GenEval's evaluator reads them."""
  return [(int(folder.name), metadata, pngs) for folder, metadata, pngs in read_folders(out_dir)]


def read_folders(out_dir: str | os.PathLike) -> list[tuple[Path, dict, list[Path]]]:
  """`read` with each prompt's folder as it is named on disk (GenEval accepts '7' as well as '00007')."""
  out_dir = Path(out_dir)
  if not out_dir.is_dir():
    raise FileNotFoundError(f"{out_dir} is not a folder")
  out = []
  for folder in sorted(p for p in out_dir.iterdir() if p.is_dir() and _is_index(p.name)):
    meta_path = folder / METADATA_FILE
    metadata = next((obj for _, obj in jsonl.objects(meta_path)), None)  # a bad line raises naming it
    if metadata is None:
      raise ValueError(f"{meta_path}: no metadata line")
    samples = folder / SAMPLES_DIR
    pngs = sorted(p for p in samples.iterdir() if p.suffix == ".png" and p.stem.isdigit()) if samples.is_dir() else []
    out.append((folder, metadata, pngs))
  return out


def load_image(path: str | os.PathLike) -> np.ndarray:
  """A sample PNG as uint8 (H, W, 3); a file that is not a readable image raises ValueError naming it."""
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"), np.uint8)
  except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
    raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}); write the sample again") from None
