"""What ``prepare`` writes: the items of each input format it ingests — a folder of images (captions from sidecar
``.txt`` or ``captions.jsonl``), a ``.jsonl``/``.csv``/``.tsv``/``.parquet`` table of (image, caption) or a folder
or glob of such tables (one dataset, as Hugging Face stores its Parquet shards), uncompressed webdataset ``.tar``
shards, or a TFDS builder directory — each an ``Item``: a stable key and a picklable loader that
returns the encoded bytes and the caption (run in prepare's worker processes)."""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import os
import tarfile
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from iomm_jax.data import corpus_files, sources


@dataclasses.dataclass(frozen=True)
class Item:
  """One input image: a stable ``key`` (its id is sha1(key)) and a picklable ``loader() -> (bytes, caption)``."""

  key: str
  loader: Callable[[], tuple[bytes, str | None]]


# ---------------------------------------------------------------------------------------------- loaders (picklable)
def _load_file(path: str, caption: str | None = None, sidecar: str | None = None) -> tuple[bytes, str | None]:
  with open(path, "rb") as f:
    data = f.read()
  if sidecar is not None:
    caption = corpus_files.decode_text(Path(sidecar).read_bytes())
  return data, caption


def _load_range(path: str, offset: int, size: int, caption: str | None) -> tuple[bytes, str | None]:
  with open(path, "rb") as f:
    f.seek(offset)
    data = f.read(size)
  if len(data) != size:
    raise OSError(f"{path}: member at offset {offset} is truncated ({len(data)} of {size} bytes)")
  return data, caption


@functools.lru_cache(maxsize=4)
def _parquet_images(path: str, column: str) -> corpus_files.ParquetImages:
  return corpus_files.ParquetImages(path, column)


def _load_parquet(path: str, column: str, row: int, caption: str | None) -> tuple[bytes, str | None]:
  return _parquet_images(path, column)[row], caption


_TFDS_FLAGS = {"split": "--split", "image_key": "--image_key"}  # what prepare's messages tell a user to set


@functools.lru_cache(maxsize=4)
def _tfds(builder_dir: str, split: str, image_key: str, caption_key: str | None) -> sources.TfdsSource:
  return sources.TfdsSource(builder_dir, split, image_key, caption_key, field="--src", options=_TFDS_FLAGS)


def _load_tfds(
    builder_dir: str, split: str, index: int, image_key: str, caption_key: str | None
) -> tuple[bytes, str | None]:
  rec = _tfds(builder_dir, split, image_key, caption_key)[index]
  if "image_bytes" in rec:
    return rec["image_bytes"], rec["caption"]
  buf = io.BytesIO()
  Image.fromarray(rec["image"]).save(buf, format="PNG")  # decoded in TFDS: store losslessly
  return buf.getvalue(), rec["caption"]


# -------------------------------------------------------------------------------------------------- enumeration
def _folder_items(root: Path) -> list[Item]:
  images = corpus_files.list_images(root)
  captions = corpus_files.folder_captions(root, images)
  items = []
  for path, sidecar in images:
    rel = path.relative_to(root).as_posix()
    items.append(
        Item(
            rel, functools.partial(_load_file, str(path), captions.get(rel), None if sidecar is None else str(sidecar))
        )
    )
  return items


def _table_items(path: Path, image_key: str, caption_key: str | None) -> list[Item]:
  items = []
  for img, cap in corpus_files.read_table(path, image_key, caption_key):
    if isinstance(img, int):  # encoded image in the table (Parquet bytes / struct): read by row when written
      items.append(Item(f"{path.name}/{img:09d}", functools.partial(_load_parquet, str(path), image_key, img, cap)))
    else:
      items.append(Item(img, functools.partial(_load_file, str(path.parent / img), cap)))
  return items


def _tables_items(tables: Sequence[Path], image_key: str, caption_key: str | None) -> list[Item]:
  """The items of several table files, as one dataset (keys of rows stored in a Parquet file name that file)."""
  return [item for table in tables for item in _table_items(table, image_key, caption_key)]


_TAR_IMAGE_EXT = tuple(e[1:] for e in corpus_files.IMAGE_EXTENSIONS)  # a webdataset member's extension, no dot
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def _compressed(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(6).startswith(_COMPRESSED_MAGIC)


def _tar_items(tars: Sequence[str]) -> list[Item]:
  items = []
  for tar in tars:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
      if os.path.getsize(tar) % tarfile.BLOCKSIZE:  # tarfile would read such a file's cut last member as its end
        raise tarfile.ReadError(f"{os.path.getsize(tar)} bytes, not a multiple of {tarfile.BLOCKSIZE}")
      with tarfile.open(tar, "r:") as tf:  # uncompressed only: members are read by offset
        for m in tf:
          if not m.isfile():
            continue
          d, base = os.path.split(m.name)
          if "." not in base or base.startswith("."):
            continue
          stem, ext = base.split(".", 1)  # webdataset: the key ends at the first dot of the basename
          groups.setdefault(f"{d}/{stem}" if d else stem, {})[ext.lower()] = m
        captions = {}
        for key, members in groups.items():
          if "txt" in members:
            captions[key] = corpus_files.decode_text(tf.extractfile(members["txt"]).read())
    except tarfile.ReadError as e:
      if _compressed(tar):
        raise ValueError(f"{tar}: a compressed tar; decompress the shards first (gunzip / xz -d)") from None
      raise ValueError(f"{tar}: not a whole tar ({e}): cut short or damaged; fetch it again or leave it out") from None
    name = os.path.basename(tar)
    for key in sorted(groups):
      ext = next((e for e in _TAR_IMAGE_EXT if e in groups[key]), None)
      if ext is None:
        continue
      m = groups[key][ext]
      items.append(Item(f"{name}/{key}", functools.partial(_load_range, tar, m.offset_data, m.size, captions.get(key))))
  return items


def _tfds_items(builder_dir: str, split: str, image_key: str, caption_key: str | None) -> list[Item]:
  n = len(_tfds(builder_dir, split, image_key, caption_key))
  return [
      Item(
          f"tfds:{Path(builder_dir).name}/{split}/{i:09d}",
          functools.partial(_load_tfds, builder_dir, split, i, image_key, caption_key),
      )
      for i in range(n)
  ]


def enumerate_items(
    src: str, image_key: str = "image", caption_key: str | None = "caption", split: str = "train"
) -> list[Item]:
  """Items of ``src`` (kind detected from the path; see the module docstring), sorted by key."""
  p = Path(os.path.expanduser(src))
  if any(c in src for c in "*?["):
    files = sorted(glob.glob(os.path.expanduser(src)))
    if files and all(f.endswith(".tar") for f in files):
      items = _tar_items(files)
    elif files and all(f.lower().endswith(corpus_files.TABLE_EXTENSIONS) for f in files):
      items = _tables_items([Path(f) for f in files], image_key, caption_key)
    else:
      raise ValueError(
          f"--src {src}: the glob must match .tar shards or table files "
          f"({', '.join(corpus_files.TABLE_EXTENSIONS)}) (matched {len(files)} files)"
      )
  elif not p.exists():
    raise ValueError(
        f"--src {src} does not exist; give a folder of images, a table ({', '.join(corpus_files.TABLE_EXTENSIONS)}), "
        ".tar shards or a TFDS builder directory"
    )
  elif sources.is_tfds_builder(p):
    items = _tfds_items(str(p), split, image_key, caption_key)
  elif p.is_dir():
    tars = sorted(str(t) for t in p.glob("*.tar"))
    tables = sorted(
        t
        for t in p.iterdir()
        if t.is_file()
        and t.name.lower().endswith(corpus_files.TABLE_EXTENSIONS)
        and t.name != corpus_files.CAPTIONS_FILE
    )
    has_images = any(True for _ in corpus_files.list_images(p)[:1])
    if tars and not has_images:
      items = _tar_items(tars)
    elif tables and not has_images:  # a dataset stored as table files (Hugging Face's train-0000N-of-0000M.parquet)
      items = _tables_items(tables, image_key, caption_key)
    else:
      items = _folder_items(p)
  elif p.name.lower().endswith((".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".tar.zst")):
    raise ValueError(f"--src {src}: a compressed tar; decompress it first and pass the .tar")
  elif p.suffix == ".tar":
    items = _tar_items([str(p)])
  else:
    items = _table_items(p, image_key, caption_key)
  if not items:
    raise ValueError(f"--src {src} holds no images ({', '.join(corpus_files.IMAGE_EXTENSIONS)}); check the path")
  items.sort(key=lambda it: it.key)
  return items
