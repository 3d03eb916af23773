"""Random-access data sources returning raw records.

A record is ``{'image_bytes': bytes}`` (encoded file) or ``{'image': uint8 HWC array}``, plus ``'caption': str|None``
and ``'id': str``. Cached-feature shards return their feature dicts instead (see ``records.py``). Sources only read:
decoding, resizing and the handling of unreadable images live in ``pipeline.py``, which treats any exception raised
by ``source[i]`` as an unreadable record.

Sources are picklable (Grain ships them to worker processes): file handles and readers are opened lazily and
dropped on pickling. A source that cannot be opened (no such file, no images, no records) raises
``data_config.DataConfigError`` naming the config field that points at it (``field``: data.path, data.val_path, …).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np

from iomm_jax import data_kinds
from iomm_jax.data import corpus_files, data_config, shard_dir
from iomm_jax.data.data_config import DataConfigError
from iomm_jax.data import decode
from iomm_jax.data import shapes
from iomm_jax.data import records

HELDOUT_SEED_OFFSET = 1000  # held-out shapes come from another draw of the world: no stage's training set holds them


def render_size(data_cfg) -> int:
  """Shapes are rendered at the larger of the two views, so that neither the autoencoder view nor the ViT view
  is an upsampled copy."""
  return max(int(data_cfg.resolution), int(data_cfg.vit_size))


def heldout_shapes(data_cfg, num: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``num`` held-out shapes images for sample grids and evaluations, as training sees them: (uint8 images at
  data.resolution, float32 ViT views). Images ``start …`` of the held-out world (:func:`heldout_world_seed`),
  which no training stage reads. ``data_cfg``: ``config.data`` or a DataConfig."""
  from PIL import Image

  data_cfg = data_config.from_config(data_cfg)
  held = heldout_source(data_cfg, start + num)
  refs, vits = [], []
  for i in range(num):
    img = Image.fromarray(held[start + i]["image"])
    refs.append(np.asarray(decode.centre_square(img, data_cfg.resolution), np.uint8))
    vits.append(decode.views(img, data_cfg.resolution, data_cfg.vit_size)[1])
  return np.stack(refs), np.stack(vits).astype(np.float32)


def heldout_world_seed(data_cfg) -> int:
  """The world seed of the held-out shapes: another draw than the training world's (``data.shapes_seed``), tied to
  it, not to ``data.seed`` (which only orders the data: changing it must not change the validation set)."""
  return int(data_cfg.shapes_seed) + HELDOUT_SEED_OFFSET


def heldout_source(data_cfg, num: int) -> "ShapesSource":
  """The held-out draw of the shapes world: ``num`` images of world :func:`heldout_world_seed`."""
  data_cfg = data_config.from_config(data_cfg)
  return ShapesSource(num, render_size(data_cfg), heldout_world_seed(data_cfg))


class ShapesSource:
  """Procedural shapes rendered on the fly (no files): ``num`` images at ``resolution`` from ``seed``."""

  def __init__(self, num: int, resolution: int, seed: int = 0):
    if num <= 0:
      raise ValueError(f"ShapesSource: num={num}; set data.num_images to a positive number")
    self.num, self.resolution, self.seed = int(num), int(resolution), int(seed)

  def __len__(self) -> int:
    return self.num

  def __getitem__(self, i: int) -> dict:
    image, caption = shapes.render(int(i), self.resolution, self.seed)
    return {"image": image, "caption": caption, "id": f"shapes-s{self.seed}/{int(i):08d}"}

  def caption(self, i: int) -> str | None:
    return shapes.scene(int(i), self.seed)["caption"]


class FolderSource:
  """Images under a folder (recursive; corpus_files.IMAGE_EXTENSIONS). Captions: sidecar ``<stem>.txt``, else
  ``captions.jsonl`` at the root (``{"file": relative path, "caption": ...}`` per line), else None."""

  def __init__(self, path: str | os.PathLike, field: str = "data.path"):
    self.root = Path(path)
    if not self.root.exists():
      raise DataConfigError(
          f"image folder {self.root} does not exist; set {field} to a folder of images "
          f"({'/'.join(e[1:] for e in corpus_files.IMAGE_EXTENSIONS)}, searched recursively)"
          + (" or use data.source='shapes'" if field == "data.path" else "")
      )
    if not self.root.is_dir():
      raise DataConfigError(
          f"{field} {self.root} is a file, not a folder; for a table of image paths use "
          "data.source='jsonl' or 'csv', for shards 'arrayrecord'"
      )
    found = corpus_files.list_images(self.root)
    if not found:
      raise DataConfigError(
          f"image folder {self.root} contains no images ({', '.join(corpus_files.IMAGE_EXTENSIONS)}, "
          f"searched recursively); put images there or point {field} at the right folder"
      )
    self.files = [str(p) for p, _ in found]
    self.sidecars = [None if t is None else str(t) for _, t in found]
    self.ids = [p.relative_to(self.root).as_posix() for p, _ in found]
    self.jsonl_captions = corpus_files.folder_captions(self.root, found)

  def __len__(self) -> int:
    return len(self.files)

  def caption(self, i: int) -> str | None:
    if self.sidecars[i] is not None:
      return corpus_files.decode_text(Path(self.sidecars[i]).read_bytes())
    return self.jsonl_captions.get(self.ids[i])

  def __getitem__(self, i: int) -> dict:
    with open(self.files[i], "rb") as f:
      data = f.read()
    return {"image_bytes": data, "caption": self.caption(i), "id": self.ids[i]}


class _TableSource:
  """Rows of (image, caption) from a table file; relative image paths are relative to the table's folder, and a
  Parquet column of encoded bytes / ``{bytes, path}`` structs is read row group by row group."""

  def __init__(
      self,
      path: str | os.PathLike,
      image_key: str = "image",
      caption_key: str | None = "caption",
      field: str = "data.path",
  ):
    path = Path(path)
    if path.is_dir():
      raise DataConfigError(
          f"{field} {path} is a folder; point it at one table file, or ingest a folder of tables (Hugging Face's "
          "Parquet shards) as one dataset with `python -m iomm_jax.data.prepare --src DIR` and data.source='arrayrecord'"
      )
    if not path.is_file():
      raise DataConfigError(
          f"table {path} does not exist; set {field} to a {type(self).__name__[:-6].lower()} "
          f"file with {image_key!r} and {caption_key!r} columns"
      )
    rows = corpus_files.read_table(path, image_key, caption_key)
    if not rows:
      raise DataConfigError(f"table {path} has no rows; add (image, caption) rows or point {field} elsewhere")
    self.captions = [r[1] for r in rows]
    self.images = None  # encoded images in the table itself (Parquet bytes / structs)
    if isinstance(rows[0][0], int):
      self.images = corpus_files.ParquetImages(path, image_key)
      self.ids = [f"{path.name}/{r[0]:09d}" for r in rows]
    else:  # image paths; `files` also lets buckets read sizes from the headers
      self.ids = [r[0] for r in rows]
      self.files = [str(path.parent / r[0]) for r in rows]

  def __len__(self) -> int:
    return len(self.captions)

  def caption(self, i: int) -> str | None:
    return self.captions[i]

  def __getitem__(self, i: int) -> dict:
    if self.images is not None:
      data = self.images[i]
    else:
      with open(self.files[i], "rb") as f:
        data = f.read()
    return {"image_bytes": data, "caption": self.captions[i], "id": self.ids[i]}


class JsonlSource(_TableSource):
  """JSON-lines file of ``{image_key: path, caption_key: text}``."""


class CsvSource(_TableSource):
  """CSV/TSV file with ``image_key`` and ``caption_key`` columns."""


class ParquetSource(_TableSource):
  """Parquet file with ``image_key`` (paths, encoded bytes or ``{bytes, path}`` structs) and ``caption_key``."""


def shard_paths(dir_or_glob: str | os.PathLike, field: str = "data.path / data.cache_path") -> list[str]:
  """ArrayRecord shard files of a directory (``*.array_record``), a glob pattern or a single file, sorted; ``field``
  names the config field that points at them in the error. A directory that ``prepare`` or the feature cache was
  stopped writing (its state folder plans shards not all finished: ``shard_dir.unfinished``) is refused, not read
  as if it were the whole dataset; a glob or a file is read as given."""
  p = str(dir_or_glob)
  if os.path.isdir(p):
    stopped = shard_dir.unfinished(p)
    if stopped:
      raise DataConfigError(f"config.{field}={p!r}: {stopped}")
    files = sorted(glob.glob(os.path.join(p, "*.array_record")))
  elif any(c in p for c in "*?["):
    files = sorted(glob.glob(p))
  else:
    files = [p] if os.path.isfile(p) else []
  if not files:
    raise DataConfigError(
        f"no ArrayRecord shards at {p!r}; write them with `python -m iomm_jax.data.prepare --src ... "
        f"--dst {p}` (or the feature cache), or fix {field}"
    )
  return files


class ArrayRecordSource:
  """Records of ArrayRecord shards written by ``prepare`` (images) or the feature cache (features)."""

  def __init__(self, dir_or_glob: str | os.PathLike, field: str = "data.path / data.cache_path"):
    self.paths = shard_paths(dir_or_glob, field)
    self._ds = None
    try:
      self._len = len(self._reader())
    except RuntimeError as e:  # array_record's C++ reader: a file cut short or not an ArrayRecord shard
      raise DataConfigError(
          f"ArrayRecord shards at {dir_or_glob} cannot be read ({str(e).splitlines()[0] if str(e) else e!r}); "
          f"re-run prepare (or the feature cache), or point {field} at intact shards"
      ) from None
    if self._len == 0:
      raise DataConfigError(
          f"ArrayRecord shards at {dir_or_glob} hold no records; re-run prepare, or point {field} at shards that "
          "hold records"
      )

  def _reader(self):
    if self._ds is None:
      import grain

      self._ds = grain.sources.ArrayRecordDataSource(self.paths)
    return self._ds

  def __getstate__(self):
    return {**self.__dict__, "_ds": None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict:
    rec = records.decode_record(self._reader()[int(i)])
    rec.setdefault("caption", None)
    return rec

  def caption(self, i: int) -> str | None:
    return self[i]["caption"]


TFDS_INFO = "dataset_info.json"  # what marks a TFDS builder directory


def is_tfds_builder(path: str | os.PathLike) -> bool:
  """Whether `path` is a TFDS builder directory (the versioned folder holding dataset_info.json)."""
  return os.path.isfile(os.path.join(path, TFDS_INFO))


class TfdsSource:
  """A TFDS dataset prepared in ``array_record`` format, read with ``tfds`` data sources (no TensorFlow).

  ``image_key`` may hold encoded bytes or a decoded uint8 array; ``caption_key`` (optional) text or bytes.
  """

  def __init__(
      self,
      builder_dir: str | os.PathLike,
      split: str = "train",
      image_key: str = "image",
      caption_key: str | None = None,
      field: str = "data.path",
      options: dict[str, str] | None = None,
  ):
    """``field`` names the path option and ``options`` the split and image key options in messages (training's
    config fields by default; prepare passes its flags)."""
    self.builder_dir, self.split = str(builder_dir), split
    self.image_key, self.caption_key = image_key, caption_key
    self.options = options or {"split": "data.split", "image_key": "data.image_key"}
    if not is_tfds_builder(self.builder_dir):
      raise DataConfigError(
          f"{self.builder_dir} is not a TFDS builder directory (no {TFDS_INFO}); point "
          f"{field} at the versioned folder, e.g. ~/tensorflow_datasets/NAME/1.0.0"
      )
    self._ds, self._checked = None, False
    self._len = len(self._source())

  def _source(self):
    if self._ds is None:
      import tensorflow_datasets as tfds

      try:
        builder = tfds.builder_from_directory(self.builder_dir)
      except Exception as e:  # a damaged dataset_info.json: protobuf's ParseError, ValueError, ...
        raise DataConfigError(
            f"{self.builder_dir}: cannot be opened as a TFDS dataset ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "check its dataset_info.json, or build the dataset again"
        ) from None
      if self.split not in builder.info.splits:
        raise DataConfigError(
            f"TFDS dataset {self.builder_dir} has no split {self.split!r} "
            f"(splits: {list(builder.info.splits)}); set {self.options['split']}"
        )
      if not self._checked:  # once, at open (a copy in a loader process has been checked)
        features = sorted(builder.info.features.keys())  # TFDS keeps no fixed order: the message must not vary
        if self.image_key not in features:  # here, not by failing every record
          raise DataConfigError(
              f"TFDS dataset {self.builder_dir} has no feature {self.image_key!r} (features: {features}); set "
              f"{self.options['image_key']}"
          )
        corpus_files.note_missing_caption_column(Path(self.builder_dir), self.caption_key, features, kind="feature")
        self._checked = True
      self._ds = builder.as_data_source(self.split)
    return self._ds

  def __getstate__(self):
    return {**self.__dict__, "_ds": None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict:
    import numpy as np

    rec = self._source()[int(i)]
    if self.image_key not in rec:
      raise KeyError(f"TFDS record has no {self.image_key!r} (keys {sorted(rec)}); set {self.options['image_key']}")
    img = rec[self.image_key]
    out = {"image_bytes": img} if isinstance(img, bytes) else {"image": np.asarray(img, np.uint8)}
    out["caption"] = corpus_files.decode_text(rec.get(self.caption_key)) if self.caption_key else None
    out["id"] = f"{self.split}/{int(i)}"
    return out

  def caption(self, i: int) -> str | None:
    return self[i]["caption"]


SOURCES = data_kinds.SOURCES  # the registry: make_source handles exactly these (tests check it)


def _resolve(path: str, workdir: str | os.PathLike | None) -> Path:
  p = Path(os.path.expanduser(path))
  return p if p.is_absolute() or workdir is None else Path(workdir) / p


def make_source(data_cfg: Any, workdir: str | os.PathLike | None = None, field: str | None = None):
  """The source named by ``data_cfg.source`` at ``data_cfg.path`` (see the module docstring for records).

  ``data_cfg``: ``config.data`` or a DataConfig. ``cached=True`` reads feature shards at ``data_cfg.cache_path``.
  For ``shapes`` an empty path renders on the fly (world ``data.shapes_seed``); a non-empty path (relative paths
  are taken relative to ``workdir``) is written once with :func:`shapes.write_folder` and read as a folder. Other
  relative paths are relative to the current directory. ``split``/``image_key``/``caption_key`` serve tfds and
  tables.

  ``field`` is the config field the path came from (default data.path, or data.cache_path when cached): errors name
  it, and the source keeps it (``source.field``, ``source.where``) for the pipeline's messages about its records.
  A source that cannot be opened raises DataConfigError.
  """
  d = data_config.from_config(data_cfg)
  field = field or ("data.cache_path" if d.cached else "data.path")
  path = d.cache_path if d.cached else os.path.expanduser(d.path)
  try:
    source = ArrayRecordSource(path, field) if d.cached else _MAKERS[d.source](d, path, workdir, field)
  except DataConfigError:
    raise
  except (ValueError, OSError) as e:  # a table's own reader (a bad line, a missing column), an unreadable file
    raise DataConfigError(f"config.{field}={path!r}: {e}") from None
  source.field, source.where = field, path or d.source
  return source


def _shapes(d: data_config.DataConfig, path: str, workdir, field: str) -> Any:
  if not path:
    return ShapesSource(d.num_images, render_size(d), d.shapes_seed)

  folder = shapes.write_folder(_resolve(path, workdir), d.num_images, d.resolution, d.shapes_seed)
  return FolderSource(folder, field)


_MAKERS = {  # data.source → maker(data config, expanded path, workdir, config field); keys == SOURCES
    "shapes": _shapes,
    "folder": lambda d, path, _, field: FolderSource(path, field),
    "arrayrecord": lambda d, path, _, field: ArrayRecordSource(path, field),
    "tfds": lambda d, path, _, field: TfdsSource(path, d.split, d.image_key, d.caption_key or None, field),
    "jsonl": lambda d, path, _, field: JsonlSource(path, d.image_key, d.caption_key or None, field),
    "csv": lambda d, path, _, field: CsvSource(path, d.image_key, d.caption_key or None, field),
    "parquet": lambda d, path, _, field: ParquetSource(path, d.image_key, d.caption_key or None, field),
}
