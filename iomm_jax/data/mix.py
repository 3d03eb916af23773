"""Seeded per-position draws with O(1) random access to running counts, and the two-source 'mix' stream.

The 'mix' recipe makes every position ``k`` of the global sample stream image-only with probability λ, independently.
When the image-only samples come from their own image set, that set must be walked in order: image-only position
``k`` reads the image set's shuffled stream at ``#{image-only positions < k}``, and a pair position reads the pair set
at ``#{pair positions < k}``. A Grain ``MapDataset`` is random access (resume, workers, per-process slices all jump
to arbitrary positions), so these counts must be available without replaying the stream. :class:`SeededDraws`
provides that:

* the stream is cut into blocks of ``BLOCK`` positions; block ``j`` holds ``c_j ~ Multinomial(BLOCK, p)`` positions
  of each category, placed by a seeded uniform permutation of the block. A multinomial total followed by a uniform
  placement is exactly an i.i.d. categorical draw per position, so the mixture is exact in expectation;
* the block totals come in groups of ``GROUP`` blocks from one generator each, so the count before position ``k``
  costs ``k / (BLOCK·GROUP)`` cheap multinomial draws once (cached), plus one permutation per visited block.

Everything is a pure function of (seed, position): independent of worker count, process count and resume point.
"""

from __future__ import annotations

import sys
import threading
from typing import NamedTuple, Sequence

import grain
import numpy as np

_MASK32 = 0xFFFFFFFF


class Slot(NamedTuple):
  """One element of the global sample stream, before reading: what ``pipeline.LoadExample`` loads.

  ``pos``: position in the global stream (before the per-process slice); ``index``: source record to read;
  ``image_set``: read it from the separate image set (the slot is then image-only); ``bucket``: aspect-ratio
  bucket (-1 = none, square crop); ``rank``: position of ``index`` in its bucket's record list (for substitutes).
  """

  pos: int
  index: int
  image_set: bool = False
  bucket: int = -1
  rank: int = -1


class SeededDraws:
  """Category of each stream position (i.i.d. with probabilities ``probs``) and counts before it, by position."""

  BLOCK = 1 << 14  # positions per block (one permutation each)
  GROUP = 256  # blocks whose totals come from one generator
  _KEEP = 8  # cached blocks / groups per process (access is sequential, so a few suffice)

  def __init__(self, probs: Sequence[float], seed: int, tag: int):
    p = np.asarray(probs, np.float64)
    if p.ndim != 1 or p.size < 2 or (p < 0).any() or p.sum() <= 0:
      raise ValueError(f"SeededDraws: probabilities {list(probs)} must be >= 0 with a positive sum")
    self.p = p / p.sum()
    self.seed, self.tag = int(seed) & _MASK32, int(tag) & _MASK32
    self._init_caches()

  def _init_caches(self) -> None:
    self._lock = threading.RLock()  # Grain's reader threads share this object
    self._groups: dict[int, np.ndarray] = {}
    self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._group_prefix = [np.zeros(self.p.size, np.int64)]  # counts before group g

  def __getstate__(self):  # caches and the lock stay behind (Grain pickles this into worker processes)
    return {"p": self.p, "seed": self.seed, "tag": self.tag}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_caches()

  def _remember(self, cache: dict, key: int, value, keep: int):
    with self._lock:
      while len(cache) >= keep:
        cache.pop(next(iter(cache)), None)
      cache[key] = value
    return value

  def _group(self, g: int) -> np.ndarray:
    counts = self._groups.get(g)
    if counts is None:
      rng = np.random.default_rng([self.seed, self.tag, 0, g])
      counts = rng.multinomial(self.BLOCK, self.p, size=self.GROUP).astype(np.int64)
      self._remember(self._groups, g, counts, self._KEEP)
    return counts

  def _before_block(self, j: int) -> np.ndarray:
    g = j // self.GROUP
    with self._lock:
      while len(self._group_prefix) <= g:
        n = len(self._group_prefix)
        self._group_prefix.append(self._group_prefix[-1] + self._group(n - 1).sum(0))
      prefix = self._group_prefix[g]
    return prefix + self._group(g)[: j % self.GROUP].sum(0)

  def _block(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    hit = self._blocks.get(j)
    if hit is None:
      counts = self._group(j // self.GROUP)[j % self.GROUP]
      labels = np.repeat(np.arange(self.p.size, dtype=np.int8), counts)
      labels = np.random.default_rng([self.seed, self.tag, 1, j]).permutation(labels)
      onehot = labels[:, None] == np.arange(self.p.size)[None, :]
      before = np.cumsum(onehot, 0, dtype=np.int32) - onehot  # exclusive running counts inside the block
      hit = self._remember(self._blocks, j, (labels, before), self._KEEP)
    return hit

  def label(self, pos: int) -> int:
    """The category of position ``pos`` (>= 0)."""
    labels, _ = self._block(int(pos) // self.BLOCK)
    return int(labels[int(pos) % self.BLOCK])

  def count_before(self, pos: int) -> np.ndarray:
    """How many positions ``< pos`` fall in each category: int64 (K,)."""
    j, r = divmod(int(pos), self.BLOCK)
    _, before = self._block(j)
    return self._before_block(j) + before[r]


MIX_TAG = 0x313  # the image-only draws of 'mix' (kept from the earlier per-position draw)


def mix_draws(seed: int, mix_lambda: float) -> SeededDraws:
  """Category 1 = image-only with probability λ, category 0 = pair."""
  return SeededDraws((1.0 - float(mix_lambda), float(mix_lambda)), seed, MIX_TAG)


def derived_seed(seed: int, salt: int) -> int:
  """An independent 32-bit seed for a second shuffled stream (e.g. the image set's order)."""
  return int(np.random.SeedSequence([int(seed) & _MASK32, int(salt)]).generate_state(1)[0])


def shuffled_stream(n: int, seed: int) -> grain.MapDataset:
  """``range(n)`` globally shuffled, reshuffled every epoch, repeated forever (random access)."""
  return grain.MapDataset.range(n).seed(seed).shuffle().repeat()


class MixedStream(grain.MapDataset):
  """The 'mix' stream over two sets: position ``k`` → ``Slot(k, index, image_set)``.

  Image-only positions (``draws``' category 1) walk ``image_stream`` in order, pair positions walk
  ``pair_stream`` in order, so each set is visited epoch by epoch with no re-draws, at the rates λ and 1 − λ.
  """

  def __init__(self, pair_stream: grain.MapDataset, image_stream: grain.MapDataset, draws: SeededDraws):
    super().__init__([pair_stream, image_stream])
    self._pair, self._image, self._draws = pair_stream, image_stream, draws

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k = int(index)
    n_image = int(self._draws.count_before(k)[1])
    if self._draws.label(k) == 1:
      return Slot(k, int(self._image[n_image]), True)
    return Slot(k, int(self._pair[k - n_image]), False)

  def __str__(self) -> str:
    return "MixedStream(pair set, image set)"
