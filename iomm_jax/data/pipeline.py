"""The Grain input pipeline: source → global shuffle → repeat → per-process slice → decode/views → batch.

``make_dataset`` returns a ``grain.IterDataset``; ``iter()`` of it is a ``DatasetIterator`` whose
``get_state()``/``set_state()`` continue exactly (save the state in every checkpoint). Each element is a dict of
numpy arrays with a leading per-process batch dimension ``b = global_batch // process_count``:

=================== ================== ==========================================================================
key                 dtype, shape       meaning
=================== ================== ==========================================================================
pixels              float32 (b,R,R,3)  autoencoder view in [-1, 1] (short-side resize + centre crop to R)
vit_pixels          float32 (b,V,V,3)  ViT view: the same square resized to V, ImageNet mean/std
caption_ids         int32 (b,T)        ``tokenize(caption)`` truncated to T=max_text_tokens, 0-padded
caption_len         int32 (b,)         number of valid ids (0 without a caption or a tokenizer)
has_caption         bool (b,)          the record has a caption
is_image_only       bool (b,)          recipe 'image': all True; 'pair': all False; 'mix': Bernoulli(λ)
skipped             int32 (b,)         unreadable records skipped to fill this slot (sum it into the metrics)
skipped_uncaptioned int32 (b,)         caption-less records skipped in a slot that needs a caption
caption_truncated   int32 (b,)         1 where a used caption was longer than T and was cut (counted in metrics)
index               int64 (b,)         source index of the record used (debugging, tests)
from_image_set      bool (b,)          only with ``data.image_source``: the record came from the image set
=================== ================== ==========================================================================

With ``data.cached=True`` the source is the feature cache and ``pixels``/``vit_pixels`` are replaced by
``vit_tokens`` (b,N,D) and ``latent`` (b,h,w,c), both in the dtype they were stored in.

Why the chain starts from ``MapDataset.range(len(source))`` rather than ``MapDataset.source(source)``: reading
happens inside the map, which knows the record index and can substitute the next readable record
(index+1, index+2, …) for an unreadable one deterministically, whatever the worker count.
The image-only/pair draw of 'mix' is a seeded i.i.d. Bernoulli(λ) per global stream position (``mix.SeededDraws``),
so it is reproducible, independent of workers and process count, and differs between epochs.

The image half of 'mix' comes either from the pair set (its images with the captions dropped; the default) or, with
``data.image_source``/``data.image_path`` (``data.image_cache_path`` when cached), from its own image set: then
image-only positions walk the image set's own shuffled order and pair positions the pair set's
(``mix.MixedStream``), each set in order, epoch after epoch. Unreadable records are replaced by the next record of
the same set and counted in ``skipped``; caption checks apply to the pair set only.

With ``data.buckets`` (a tuple of (height, width) shapes; see ``buckets.py``) each record is assigned to the bucket
of nearest aspect ratio, resized to cover it and centre-cropped to it; ``pixels`` is then (b,H,W,3) with (H, W)
the bucket of that batch, and a ``bucket`` int32 (b,) field names it. Every global batch comes from one bucket
(``buckets.BucketStream``: batches of different buckets interleaved in a seeded order, each bucket's records walked
in their own shuffled order), so all processes agree on the shape of step k; the ViT view stays V×V. Without
buckets every image is centre-cropped to a square of side ``data.resolution``.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import Any, Callable

import grain
import numpy as np

from iomm_jax.data import buckets as buckets_lib
from iomm_jax.data import data_config, decode, holdout, mix, sources
from iomm_jax.data.data_config import DataConfig, DataConfigError

MAX_CONSECUTIVE_SKIPS = 256  # unreadable/uncaptioned records tolerated in a row before the pipeline fails
MAX_NAMED_SKIPS = 10  # unreadable records named on stderr per process; all of them are counted in `skipped`
_named_skips: set = set()


def _name_skip(where: str, source: Any, index: int, error: str) -> None:
  """One stderr line for each of the first MAX_NAMED_SKIPS distinct unreadable records of this process, so that the
  user can find and fix the files that `skipped_total` counts (a record drawn again, next epoch, is not named twice)."""
  if (where, index) in _named_skips or len(_named_skips) > MAX_NAMED_SKIPS:
    return
  _named_skips.add((where, index))
  if len(_named_skips) > MAX_NAMED_SKIPS:
    print(
        "data: more unreadable records; they are counted in skipped_total (metrics.jsonl), not named", file=sys.stderr
    )
    return
  ids = getattr(source, "ids", None)
  name = repr(ids[index]) if ids is not None and index < len(ids) else f"index {index}"
  # One write per line: loader threads naming skips at once must not run their lines together.
  sys.stderr.write(f"data: skipped unreadable record {name} of {where} ({error}); counted in skipped_total\n")


CAPTION_CHECK_RECORDS = 64  # pair recipes check the first N source records for captions at start
# The image arrays an example carries: cached features (data.cached=True) or raw pixels for the autoencoder and ViT.
IMAGE_KEYS = {True: ("latent", "vit_tokens"), False: ("pixels", "vit_pixels")}


class ProcessBlocks(grain.MapDataset):
  """This process's rows of every global batch: a contiguous block, so batches are independent of process count.

  Local item j is global item (j // b)·G + p·b + j % b (b = per-process batch, G = global batch). Process p's
  devices hold global rows [p·b, (p+1)·b) of each batch (`jax.make_array_from_process_local_data`), so the global
  batch — and every per-row random draw of the step — is the same on 1 process or many.
  """

  def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int, per_process: int):
    super().__init__(parent)
    self._p, self._n, self._b = int(process_index), int(process_count), int(per_process)
    self._length = len(parent) // self._n

  def __len__(self) -> int:
    return self._length

  def _global(self, j: int) -> int:
    return (j // self._b) * self._b * self._n + self._p * self._b + j % self._b

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global(index)]

  def __str__(self) -> str:
    return f"ProcessBlocks(process {self._p} of {self._n}, {self._b} per batch)"


def _with_position(pos: int, idx: int) -> mix.Slot:
  return mix.Slot(int(pos), int(idx))


class LoadExample:
  """Map function: ``mix.Slot`` (global stream position, source index, …) → one example dict (module docstring).

  ``image_source``: the separate image set of 'mix' (``data.image_source``); slots flagged ``image_set`` read it.
  ``bucket_lists``: with ``data.buckets``, the record indices of each bucket; a slot of bucket b is cropped to
  that bucket's shape, and an unreadable record is replaced by the next record of the same bucket.
  """

  def __init__(
      self,
      source: Any,
      spec: DataConfig,
      tokenize: Callable[[str], list[int]] | None = None,
      image_source: Any = None,
      bucket_lists: list | None = None,
  ):
    self.source, self.spec, self.tokenize = source, spec, tokenize
    self.image_source, self.bucket_lists = image_source, bucket_lists
    self.n = len(source)
    self.draws = mix.mix_draws(spec.seed, spec.mix_lambda) if spec.recipe == "mix" else None
    # The field and place the records come from, for messages: a held-out set is data.val_path's, not data.path's.
    self.field = getattr(source, "field", None) or ("data.cache_path" if spec.cached else "data.path")
    self.where = getattr(source, "where", None) or spec.where

  def image_only(self, pos: int) -> bool:
    """Whether global stream position ``pos`` is an image-only sample (recipe 'mix': Bernoulli(λ), seeded)."""
    s = self.spec
    if s.recipe == "image":
      return True
    if s.recipe == "pair":
      return False
    return self.draws.label(pos) == 1

  def _caption_fields(self, rec: dict) -> dict:
    t = self.spec.max_text_tokens
    ids = np.zeros((t,), np.int32)
    caption = rec.get("caption")
    stored = rec.get("caption_ids")
    truncated = False
    if stored is not None:
      full = np.asarray(stored, np.int32).reshape(-1)
      toks, truncated = full[:t], len(full) > t
    elif caption is not None and self.tokenize is not None:
      if hasattr(self.tokenize, "with_truncation"):  # iomm.Tokenize cuts the caption, never the template
        full, truncated = self.tokenize.with_truncation(caption)
      else:
        full = list(self.tokenize(caption))
      toks, truncated = np.asarray(full[:t], np.int32), truncated or len(full) > t
    else:
      toks = np.zeros((0,), np.int32)
    ids[: len(toks)] = toks
    return {
        "caption_ids": ids,
        "caption_len": np.int32(len(toks)),
        "has_caption": np.bool_(caption is not None or stored is not None),
        "caption_truncated": np.int32(truncated),
    }

  def _payload(self, rec: dict, image_set: bool = False, bucket: int = -1) -> dict:
    s = self.spec
    kind = rec.get("kind")
    where = s.image_where if image_set else s.where
    prefix = "image_" if image_set else ""
    if s.cached:
      if kind != "features":
        raise DataConfigError(
            f"data.cached=True but {where} holds {kind or 'raw'} records, not cached "
            f"features; point data.{prefix}cache_path at the output of "
            "`python -m iomm_jax.cache`"
        )
      return {k: np.array(rec[k]) for k in IMAGE_KEYS[True]}
    if kind == "features":
      raise DataConfigError(f"{where} holds cached features; set data.cached=True and data.{prefix}cache_path " "to it")
    if bucket >= 0:
      height, width = s.buckets[bucket]
      draft = max(height, width)  # covers any crop
      im = decode.to_rgb(rec, draft_size=draft, max_pixels=s.max_image_pixels, min_side=s.min_image_side)
      pixels, vit_pixels = decode.views(im, height, s.vit_size, width=width)
    else:
      im = decode.to_rgb(rec, draft_size=s.resolution, max_pixels=s.max_image_pixels, min_side=s.min_image_side)
      pixels, vit_pixels = decode.views(im, s.resolution, s.vit_size)
    return dict(zip(IMAGE_KEYS[False], (pixels, vit_pixels)))

  def __call__(self, slot: tuple) -> dict:
    slot = mix.Slot(*slot)
    pos, idx = slot.pos, slot.index
    from_image_set = bool(slot.image_set)
    if from_image_set and self.image_source is None:
      raise ValueError("LoadExample: an image-set slot but no image_source was given")
    source = self.image_source if from_image_set else self.source
    where = self.spec.image_where if from_image_set else self.where
    bucket = int(slot.bucket)
    if bucket >= 0:  # candidates: this bucket's records, from the slot's rank on
      members = self.bucket_lists[bucket]
      n, first = len(members), int(slot.rank)
    else:
      members, n, first = None, len(source), idx
    # With a separate image set the stream decides (image-set slot ⇔ image-only); else the seeded draw does.
    image_only = from_image_set or (not self.spec.has_image_set and self.image_only(pos))
    needs_caption = not image_only
    skipped = uncaptioned = 0
    first_error = None
    for k in range(min(n, MAX_CONSECUTIVE_SKIPS + 1)):
      # an unreadable record is replaced by the next one of the same set (and bucket)
      j = (first + k) % n if members is None else int(members[(first + k) % n])
      try:
        rec = source[j]
      except Exception as e:  # unreadable file / corrupt record
        skipped += 1
        first_error = first_error or f"{type(e).__name__}: {e}"
        _name_skip(where, source, j, f"{type(e).__name__}: {e}")
        continue
      if needs_caption and rec.get("caption") is None and rec.get("caption_ids") is None:
        if not self.spec.skip_uncaptioned:
          raise DataConfigError(
              f"record {rec.get('id', j)!r} (index {j}) of {self.spec.where} has no caption, but recipe "
              f"{self.spec.recipe!r} needs one for this sample; caption it, or set "
              "data.skip_uncaptioned=True to count and skip such records"
          )
        uncaptioned += 1
        continue
      try:
        out = self._payload(rec, from_image_set, bucket)
      except DataConfigError:
        raise
      except Exception as e:
        skipped += 1
        first_error = first_error or f"{rec.get('id', j)}: {type(e).__name__}: {e}"
        _name_skip(where, source, j, f"{type(e).__name__}: {e}")
        continue
      out.update(self._caption_fields(rec))
      if image_only:  # the caption is not used, so its length does not matter
        out["caption_truncated"] = np.int32(0)
      out.update(
          is_image_only=np.bool_(image_only),
          skipped=np.int32(skipped),
          skipped_uncaptioned=np.int32(uncaptioned),
          index=np.int64(j),
      )
      if self.spec.has_image_set:
        out["from_image_set"] = np.bool_(from_image_set)
      if self.spec.buckets:
        out["bucket"] = np.int32(bucket)
      return out
    image_field = "data.image_cache_path" if self.spec.cached else "data.image_path"
    raise DataConfigError(
        f"{skipped + uncaptioned} records in a row from index {idx} of {where}"
        f"{'' if bucket < 0 else f' (bucket {self.spec.buckets[bucket]})'} are unusable "
        f"({skipped} unreadable, {uncaptioned} without caption; first error: {first_error}); check the "
        f"data (e.g. re-run prepare, which validates images) or config.{image_field if from_image_set else self.field}"
    )


def _first_features(source: Any) -> dict | None:
  for i in range(min(len(source), MAX_CONSECUTIVE_SKIPS)):
    try:
      rec = source[i]
    except Exception:  # unreadable: the pipeline counts it later
      continue
    if rec.get("kind") == "features":
      return rec
  return None


def check_same_features(pair_source: Any, image_source: Any, spec: DataConfig) -> None:
  """Cached 'mix' with its own image set: both caches must hold features of the same shapes (same model and
  resolution), else image-only and pair samples could not share a batch."""
  a, b = _first_features(pair_source), _first_features(image_source)
  if a is None or b is None:
    return  # raw records or nothing readable: _payload reports it with the right field name
  for key in IMAGE_KEYS[True]:
    if np.shape(a[key]) != np.shape(b[key]):
      raise DataConfigError(
          f"data.image_cache_path={spec.image_where!r} holds {key} of shape {np.shape(b[key])} but "
          f"data.cache_path={spec.where!r} holds {np.shape(a[key])}; build both caches with the same config "
          "(model and data.resolution)"
      )


IMAGE_SET_SALT = 0x1A6E  # the image set's shuffle seed is derived from data.seed with this salt


def check_captions(source: Any, spec: DataConfig, num: int = CAPTION_CHECK_RECORDS) -> None:
  """Pair/mix recipes: fail at start if one of the first ``num`` source records has no caption (unless
  ``skip_uncaptioned``). Only the first ``num`` are checked so that start-up stays O(1) in dataset size; a later
  caption-less record fails (or is skipped) when it is drawn."""
  if spec.recipe == "image" or spec.skip_uncaptioned:
    return
  for i in range(min(num, len(source))):
    try:
      if spec.cached or not hasattr(source, "caption"):
        rec = source[i]
        caption = rec.get("caption") if rec.get("caption_ids") is None else "<token ids>"
      else:
        caption = source.caption(i)
    except Exception:  # unreadable records are the pipeline's business, counted later
      continue
    if caption is None:
      rid = getattr(source, "ids", None)
      rid = rid[i] if rid is not None else i
      raise DataConfigError(
          f"record {rid!r} (index {i}) of {spec.where} has no caption, but data.recipe={spec.recipe!r} needs "
          "captions; caption it (sidecar .txt, captions.jsonl, or a table's caption column, named by "
          f"data.caption_key={spec.caption_key!r}), use recipe 'image', or "
          "set data.skip_uncaptioned=True to count and skip caption-less records"
      )


def make_dataset(
    data_cfg: Any,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    workdir: str | None = None,
    tokenize: Callable[[str], list[int]] | None = None,
    source: Any = None,
    image_source: Any = None,
) -> grain.IterDataset:
  """Builds this process's Grain pipeline (see the module docstring); ``iter()`` it to get the iterator.

  ``data_cfg``: ``config.data`` or a :class:`DataConfig` (``data_config.from_config`` validates it once).
  ``source`` overrides ``holdout.train_source(data_cfg, workdir)`` (tests, custom data), ``image_source`` likewise
  the image set of 'mix' (only with ``data.image_source`` set). ``tokenize`` must be picklable when
  ``data_cfg.num_workers > 0``.
  """
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
        f"global batch {global_batch} is not divisible by the {process_count} processes; "
        "choose a batch size that is a multiple of the process count"
    )
  spec = data_config.from_config(data_cfg)  # validated once, before any data is opened
  workers = spec.num_workers
  if source is None:
    source = holdout.train_source(spec, workdir)
  if spec.has_image_set and image_source is None:
    field = "data.image_cache_path" if spec.cached else "data.image_path"
    image_source = sources.make_source(spec.as_image_set(), workdir, field)
  elif image_source is not None and not spec.has_image_set:
    raise ValueError("make_dataset: image_source was given but data.image_source is ''")
  check_captions(source, spec)  # the pair set only: image-only samples need no caption
  lists = buckets_lib.bucket_lists(source, spec.buckets) if spec.buckets else None
  load = LoadExample(source, spec, tokenize, image_source, lists)
  if lists is None:
    load(mix.Slot(0, 0))  # fail fast, in this process, on config errors or an all-unreadable dataset
  else:
    b = next(b for b, members in enumerate(lists) if len(members))
    load(mix.Slot(0, int(lists[b][0]), False, b, 0))

  if spec.buckets:
    ds = buckets_lib.BucketStream(lists, global_batch, spec.seed)  # each global batch from one bucket
  elif spec.has_image_set:
    if spec.cached:
      check_same_features(source, image_source, spec)
    load(mix.Slot(0, 0, True))
    ds = mix.MixedStream(
        mix.shuffled_stream(len(source), spec.seed),
        mix.shuffled_stream(len(image_source), mix.derived_seed(spec.seed, IMAGE_SET_SALT)),
        load.draws,
    )
  else:
    ds = mix.shuffled_stream(len(source), spec.seed)
    ds = ds.map_with_index(_with_position)  # position in the global stream (before the per-process slice)
  ds = ProcessBlocks(ds, process_index, process_count, global_batch // process_count)
  ds = ds.map(load)
  ds = ds.batch(global_batch // process_count, drop_remainder=True)
  prefetch, threads = spec.prefetch_buffer, spec.num_threads
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads)))
  if workers > 0:
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, prefetch))
    it = it.mp_prefetch(options, worker_init_fn=_worker_ignores_ctrl_c)
  return it


def _worker_ignores_ctrl_c(worker_index: int, num_workers: int) -> None:
  """Grain worker start-up. A terminal's Ctrl-C reaches the whole process group; the trainer answers it by saving
  and then closes its workers itself, so a worker must not die of it first (one KeyboardInterrupt traceback each)."""
  del worker_index, num_workers
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_examples(data_cfg: Any, source: Any, num: int, tokenize: Callable[[str], list[int]] | None = None) -> dict:
  """The first ``num`` readable records of ``source`` (fewer if it is smaller) as one batch of numpy arrays, made
  exactly as training makes them (:class:`LoadExample`: the same decode, crop, ViT view and caption template), square
  at data.resolution. Every example is marked image-only, so caption-less records are kept (``has_caption`` says)."""
  d = data_config.from_config(data_cfg)
  spec = dataclasses.replace(d, recipe="image", image_source="", image_path="", image_cache_path="", buckets=())
  load = LoadExample(source, spec, tokenize)
  rows = [load(mix.Slot(i, i)) for i in range(min(num, len(source)))]
  if not rows:
    where = getattr(source, "where", None) or d.where
    raise DataConfigError(f"the held-out set of {where} is empty; check data.val_path / data.val_fraction")
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
