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
index               int64 (b,)         source index of the record used (debugging, tests)
=================== ================== ==========================================================================

With ``data.cached=True`` the source is the feature cache and ``pixels``/``vit_pixels`` are replaced by
``vit_tokens`` (b,N,D) and ``latent`` (b,h,w,c), both in the dtype they were stored in.

Why the chain starts from ``MapDataset.range(len(source))`` rather than ``MapDataset.source(source)``: reading
happens inside the map, which knows the record index and can substitute the next readable record
(index+1, index+2, …) for an unreadable one deterministically, whatever the worker count.
The image-only/pair draw of 'mix' uses an rng seeded by (seed, global stream position), so it is reproducible,
independent of workers and process count, and differs between epochs.
Aspect-ratio buckets are not implemented: every image is centre-cropped to a square.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import numpy as np

from iomm_jax.data import decode, sources

RECIPES = ("image", "pair", "mix")
MAX_CONSECUTIVE_SKIPS = 256  # unreadable/uncaptioned records tolerated in a row before the pipeline fails
CAPTION_CHECK_RECORDS = 64  # pair recipes check the first N source records for captions at start


class DataConfigError(ValueError):
    """The data is not what the configuration says (never counted as a skip)."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    recipe: str
    mix_lambda: float
    seed: int
    resolution: int
    vit_size: int
    max_text_tokens: int
    skip_uncaptioned: bool
    cached: bool
    where: str  # data path, for error messages


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


def _with_position(pos: int, idx: int) -> tuple[int, int]:
    return int(pos), int(idx)


class LoadExample:
    """Map function: (global stream position, source index) → one example dict (see the module docstring)."""

    def __init__(self, source: Any, spec: _Spec, tokenize: Callable[[str], list[int]] | None = None):
        self.source, self.spec, self.tokenize = source, spec, tokenize
        self.n = len(source)

    def image_only(self, pos: int) -> bool:
        s = self.spec
        if s.recipe == "image":
            return True
        if s.recipe == "pair":
            return False
        return bool(np.random.default_rng([s.seed & 0xFFFFFFFF, pos, 0x313]).random() < s.mix_lambda)

    def _caption_fields(self, rec: dict) -> dict:
        t = self.spec.max_text_tokens
        ids = np.zeros((t,), np.int32)
        caption = rec.get("caption")
        stored = rec.get("caption_ids")
        if stored is not None:
            toks = np.asarray(stored, np.int32).reshape(-1)[:t]
        elif caption is not None and self.tokenize is not None:
            toks = np.asarray(list(self.tokenize(caption))[:t], np.int32)
        else:
            toks = np.zeros((0,), np.int32)
        ids[: len(toks)] = toks
        return {"caption_ids": ids, "caption_len": np.int32(len(toks)), "has_caption": np.bool_(caption is not None
                                                                                                or stored is not None)}

    def _payload(self, rec: dict) -> dict:
        s = self.spec
        kind = rec.get("kind")
        if s.cached:
            if kind != "features":
                raise DataConfigError(f"data.cached=True but {s.where} holds {kind or 'raw'} records, not cached "
                                      "features; point data.cache_path at the output of `python -m iomm_jax.cache`")
            return {"vit_tokens": np.array(rec["vit_tokens"]), "latent": np.array(rec["latent"])}
        if kind == "features":
            raise DataConfigError(f"{s.where} holds cached features; set data.cached=True and data.cache_path to it")
        im = decode.to_rgb(rec, draft_size=s.resolution)
        pixels, vit_pixels = decode.views(im, s.resolution, s.vit_size)
        return {"pixels": pixels, "vit_pixels": vit_pixels}

    def __call__(self, pos_idx: tuple[int, int]) -> dict:
        pos, idx = pos_idx
        image_only = self.image_only(pos)
        needs_caption = not image_only
        skipped = uncaptioned = 0
        first_error = None
        for k in range(min(self.n, MAX_CONSECUTIVE_SKIPS + 1)):
            j = (idx + k) % self.n
            try:
                rec = self.source[j]
            except Exception as e:  # unreadable file / corrupt record
                skipped += 1
                first_error = first_error or f"{type(e).__name__}: {e}"
                continue
            if needs_caption and rec.get("caption") is None and rec.get("caption_ids") is None:
                if not self.spec.skip_uncaptioned:
                    raise DataConfigError(
                        f"record {rec.get('id', j)!r} (index {j}) of {self.spec.where} has no caption, but recipe "
                        f"{self.spec.recipe!r} needs one for this sample; caption it, or set "
                        "data.skip_uncaptioned=True to count and skip such records")
                uncaptioned += 1
                continue
            try:
                out = self._payload(rec)
            except DataConfigError:
                raise
            except Exception as e:
                skipped += 1
                first_error = first_error or f"{rec.get('id', j)}: {type(e).__name__}: {e}"
                continue
            out.update(self._caption_fields(rec))
            out.update(is_image_only=np.bool_(image_only), skipped=np.int32(skipped),
                       skipped_uncaptioned=np.int32(uncaptioned), index=np.int64(j))
            return out
        raise RuntimeError(
            f"{skipped + uncaptioned} records in a row from index {idx} of {self.spec.where} are unusable "
            f"({skipped} unreadable, {uncaptioned} without caption; first error: {first_error}); check the "
            "data (e.g. re-run prepare, which validates images) or the data path")


def _spec(data_cfg: Any, where: str) -> _Spec:
    recipe = data_cfg.recipe
    if recipe not in RECIPES:
        raise ValueError(f"data.recipe={recipe!r} is not one of {RECIPES}")
    lam = float(getattr(data_cfg, "mix_lambda", 0.5))
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"data.mix_lambda={lam} must be in [0, 1] (the share of image-only samples)")
    for name in ("resolution", "vit_size", "max_text_tokens"):
        if int(getattr(data_cfg, name)) <= 0:
            raise ValueError(f"data.{name}={getattr(data_cfg, name)} must be positive")
    return _Spec(recipe=recipe, mix_lambda=lam, seed=int(data_cfg.seed), resolution=int(data_cfg.resolution),
                 vit_size=int(data_cfg.vit_size), max_text_tokens=int(data_cfg.max_text_tokens),
                 skip_uncaptioned=bool(getattr(data_cfg, "skip_uncaptioned", False)),
                 cached=bool(getattr(data_cfg, "cached", False)), where=where)


def check_captions(source: Any, spec: _Spec, num: int = CAPTION_CHECK_RECORDS) -> None:
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
                "captions; caption it (sidecar .txt, captions.jsonl or a caption column), use recipe 'image', or "
                "set data.skip_uncaptioned=True to count and skip caption-less records")


def make_dataset(data_cfg: Any, *, global_batch: int, process_index: int = 0, process_count: int = 1,
                 workdir: str | None = None, tokenize: Callable[[str], list[int]] | None = None,
                 source: Any = None) -> grain.IterDataset:
    """Builds this process's Grain pipeline (see the module docstring); ``iter()`` it to get the iterator.

    ``source`` overrides ``sources.make_source(data_cfg, workdir)`` (tests, custom data). ``tokenize`` must be
    picklable when ``data_cfg.num_workers > 0``.
    """
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} processes; "
                         "choose a batch size that is a multiple of the process count")
    workers = int(getattr(data_cfg, "num_workers", 0))
    if workers < 0:
        raise ValueError(f"data.num_workers={workers} must be >= 0 (0 = in the main process)")
    if source is None:
        source = sources.make_source(data_cfg, workdir)
    where = str(getattr(data_cfg, "cache_path", "") if getattr(data_cfg, "cached", False)
                else (getattr(data_cfg, "path", "") or data_cfg.source))
    spec = _spec(data_cfg, where)
    check_captions(source, spec)
    load = LoadExample(source, spec, tokenize)
    load((0, 0))  # fail fast, in this process, on config errors or an all-unreadable dataset

    ds = grain.MapDataset.range(len(source))
    ds = ds.seed(spec.seed).shuffle().repeat()
    ds = ds.map_with_index(_with_position)  # position in the global stream (before the per-process slice)
    ds = ProcessBlocks(ds, process_index, process_count, global_batch // process_count)
    ds = ds.map(load)
    ds = ds.batch(global_batch // process_count, drop_remainder=True)
    prefetch = int(getattr(data_cfg, "prefetch_buffer", 2) or 0)
    threads = int(getattr(data_cfg, "num_threads", 2))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads)))
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, prefetch)))
    return it
