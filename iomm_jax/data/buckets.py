"""Aspect-ratio buckets for multi-resolution training (``data.buckets``): a fixed set of (height, width) shapes.

* **Assignment.** Each record goes to the bucket whose aspect ratio is nearest in log space (``|log(w/h) −
  log(bw/bh)|``, ties to the earlier bucket). Sizes come from the ``prepare`` sizes sidecar of ArrayRecord shards
  (``.prepare/<shard>.sizes.npy``), else from the records / image headers, read once at start. A record whose size
  cannot be read goes to the bucket nearest to square: it is drawn like any other and then skipped and counted.
* **Crop.** ``decode.views(im, height, V, width=width)``, the one image-preparation path: resized (bicubic,
  antialiased) to cover the bucket and centre-cropped to it in one PIL resize with a crop box; the ViT view is that
  region of the original resized to V×V (one tile, as InternVL does).
* **Batches.** Every global batch comes from one bucket, so the step sees one static shape per bucket and every
  process agrees on the bucket of batch k. :class:`BucketSchedule` orders the batches: in "epoch" e, bucket b
  contributes ``floor((e+1)·n_b/G) − floor(e·n_b/G)`` batches (n_b records, G = global batch), so over time each
  bucket is drawn in proportion to its size, and the epoch's batches are put in a seeded random order. Inside a
  bucket, the records are walked in a per-bucket shuffled order, epoch after epoch.

All of it is a pure function of (seed, stream position), so output is independent of workers, processes and resume.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np

from iomm_jax.data import decode, mix, sources
from iomm_jax.data_kinds import DIVISOR, check_buckets  # noqa: F401  (part of this module's API)
from iomm_jax.data import prepare

_SCAN_WARN = 10_000  # scanning more records than this for sizes logs a hint to use prepare's sidecar
_log = logging.getLogger(__name__)


def assign(sizes: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
  """Bucket of each record: nearest aspect ratio in log space. ``sizes`` (N, 2) = (height, width); a row with a
  non-positive side (unknown size) goes to the bucket nearest to square. Returns int32 (N,)."""
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  known = (sizes > 0).all(1)
  log_ar = np.zeros(len(sizes))
  log_ar[known] = np.log(sizes[known, 1] / sizes[known, 0])
  targets = np.log(np.array([w / h for h, w in buckets], np.float64))
  return np.argmin(np.abs(log_ar[:, None] - targets[None, :]), axis=1).astype(np.int32)  # first on ties


# ------------------------------------------------------------------------------------------------ record sizes
def _header_size(data_or_path) -> tuple[int, int]:
  try:
    w, h = decode.header_size(data_or_path)  # as displayed: EXIF rotation applied, as decode does
    return h, w
  except Exception:  # unreadable: size unknown, the pipeline skips and counts it when drawn
    return 0, 0


def _record_size(rec: dict) -> tuple[int, int]:
  if rec.get("height") and rec.get("width"):
    return int(rec["height"]), int(rec["width"])
  if rec.get("image") is not None:
    shape = np.shape(rec["image"])
    return (int(shape[0]), int(shape[1])) if len(shape) >= 2 else (0, 0)
  if rec.get("image_bytes"):
    return _header_size(rec["image_bytes"])
  return 0, 0


def _safe_record_size(source: Any, i: int) -> tuple[int, int]:
  try:
    return _record_size(source[i])
  except Exception:
    return 0, 0


def _sidecar_sizes(source: sources.ArrayRecordSource) -> np.ndarray | None:
  parts = []
  for p in source.paths:
    f = prepare.sizes_path(p)
    if not f.is_file():
      return None
    parts.append(np.load(f))
  sizes = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
  return sizes if len(sizes) == len(source) else None  # stale sidecars: fall back to reading the records


def record_sizes(source: Any, threads: int = 16) -> np.ndarray:
  """(height, width) of every record of ``source`` as int64 (N, 2); (0, 0) where unreadable.

  Uses, in order: ``source.sizes()`` if the source has it; the constant size of procedural shapes; the sizes
  sidecar that ``prepare`` writes next to ArrayRecord shards; image headers of file-backed sources; the records.
  """
  n = len(source)
  if hasattr(source, "sizes"):
    return np.asarray(source.sizes(), np.int64).reshape(n, 2)
  if isinstance(source, sources.ShapesSource):
    return np.full((n, 2), source.resolution, np.int64)
  if isinstance(source, sources.ArrayRecordSource):
    found = _sidecar_sizes(source)
    if found is not None:
      return found.astype(np.int64)
  if n > _SCAN_WARN:
    _log.warning(
        "data.buckets: reading the sizes of %d records at start; for large sets write ArrayRecord "
        "shards with `python -m iomm_jax.data.prepare` (it stores a sizes sidecar)",
        n,
    )
  files = getattr(source, "files", None)
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    if files is not None and len(files) == n:
      out = list(pool.map(_header_size, files, chunksize=64))
    else:
      out = list(pool.map(lambda i: _safe_record_size(source, i), range(n), chunksize=64))
  return np.asarray(out, np.int64).reshape(n, 2)


def bucket_lists(source: Any, buckets: Sequence[tuple[int, int]]) -> list[np.ndarray]:
  """The record indices of each bucket (ascending), as compact integer arrays."""
  which = assign(record_sizes(source), buckets)
  dtype = np.int32 if len(which) < 2**31 else np.int64
  return [np.flatnonzero(which == b).astype(dtype) for b in range(len(buckets))]


# --------------------------------------------------------------------------------------------- batch schedule
class BucketSchedule:
  """Global batch k → (bucket, how many batches of that bucket came before k); see the module docstring."""

  TAG = 0xB0C7

  def __init__(self, sizes: Sequence[int], global_batch: int, seed: int):
    self.sizes = [int(s) for s in sizes]
    self.total = sum(self.sizes)
    if self.total <= 0 or global_batch <= 0:
      raise ValueError(f"BucketSchedule: no records in any bucket ({self.sizes}) or batch {global_batch}")
    self.g, self.seed = int(global_batch), int(seed) & 0xFFFFFFFF
    self._init_caches()

  def _init_caches(self) -> None:
    self._lock = threading.Lock()
    self._labels: dict[int, np.ndarray] = {}
    self._batches: dict[int, tuple[int, int]] = {}

  def __getstate__(self):
    return {"sizes": self.sizes, "total": self.total, "g": self.g, "seed": self.seed}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_caches()

  def before(self, epoch: int) -> list[int]:
    """Batches of each bucket in epochs ``< epoch`` (exact integers)."""
    return [epoch * n // self.g for n in self.sizes]

  def _epoch_of(self, k: int) -> int:
    """The epoch e holding batch k: the largest e with sum(before(e)) <= k (that epoch is never empty)."""
    hi = max(1, (k + 1 + len(self.sizes)) * self.g // self.total + 1)
    while sum(self.before(hi)) <= k:
      hi *= 2
    lo = 0
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if sum(self.before(mid)) <= k else (lo, mid)
    return lo

  def _epoch_labels(self, e: int) -> np.ndarray:
    labels = self._labels.get(e)
    if labels is None:
      counts = np.array(self.before(e + 1), np.int64) - np.array(self.before(e), np.int64)
      labels = np.repeat(np.arange(len(self.sizes), dtype=np.int32), counts)
      labels = np.random.default_rng([self.seed, self.TAG, e]).permutation(labels)
      with self._lock:
        while len(self._labels) >= 4:
          self._labels.pop(next(iter(self._labels)), None)
        self._labels[e] = labels
    return labels

  def batch(self, k: int) -> tuple[int, int]:
    """(bucket of global batch k, number of earlier batches of that bucket)."""
    hit = self._batches.get(k)
    if hit is None:
      e = self._epoch_of(k)
      i = k - sum(self.before(e))
      labels = self._epoch_labels(e)
      b = int(labels[i])
      hit = (b, self.before(e)[b] + int(np.count_nonzero(labels[:i] == b)))
      with self._lock:
        while len(self._batches) >= 64:
          self._batches.pop(next(iter(self._batches)), None)
        self._batches[k] = hit
    return hit


class BucketStream(grain.MapDataset):
  """Global stream position q → ``Slot(q, index, bucket=b, rank=r)``: batch ``q // G`` is one bucket's batch.

  Inside bucket b, its records are walked in a shuffled order (reshuffled each pass): slot ``c·G + q % G`` of
  that order, where c counts the earlier batches of bucket b (:class:`BucketSchedule`).
  """

  SALT = 0xB000

  def __init__(self, lists: Sequence[np.ndarray], global_batch: int, seed: int):
    streams = [
        mix.shuffled_stream(len(lst), mix.derived_seed(seed, self.SALT + b)) if len(lst) else None
        for b, lst in enumerate(lists)
    ]
    super().__init__([s for s in streams if s is not None])
    self._lists, self._streams, self._g = list(lists), streams, int(global_batch)
    self._schedule = BucketSchedule([len(lst) for lst in lists], global_batch, seed)

  @property
  def schedule(self) -> BucketSchedule:
    return self._schedule

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, r = divmod(int(index), self._g)
    b, c = self._schedule.batch(k)
    rank = int(self._streams[b][c * self._g + r])
    return mix.Slot(int(index), int(self._lists[b][rank]), False, b, rank)

  def __str__(self) -> str:
    return f"BucketStream({[len(lst) for lst in self._lists]} records per bucket)"


def describe(lists: Sequence[np.ndarray], buckets: Sequence[tuple[int, int]]) -> str:
  """'512x512: 900, 384x640: 80, …' for logs and errors."""
  return ", ".join(f"{h}x{w}: {len(lst)}" for (h, w), lst in zip(buckets, lists))
