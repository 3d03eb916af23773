"""Validation inside a training run: the held-out examples and a deterministic validation loss.

The held-out set (``data.val_fraction``, ``data.val_path``, or another draw of the shapes world; ``data/holdout.py``)
is read once at start: its first ``data.val_num`` records, preprocessed as training preprocesses them. Every
``train.eval_every`` steps the loss of the sampling weights (EMA when ``sample.use_ema``) is computed on all of them
at each of ``train.eval_timesteps``, with noise and token masks drawn from a fixed key — so the figure is the same
on any mesh or process count and before and after a resume, and two runs of one config are comparable. Three losses
share the images and the noise:

- ``val_loss_image``: conditioned on the image itself (masked with ``train.mask_ratio``: the pre-training task);
- ``val_loss_text``: conditioned on the caption (rows with one; absent when the held-out set has no captions);
- ``val_loss_uncond``: the empty prompt. ``val_loss_uncond − val_loss_image`` is how much the condition tells the DiT.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iomm_jax import parallel
from iomm_jax.data import holdout, pipeline
from iomm_jax.models import iomm
from iomm_jax.train import loss as loss_lib

VAL_SEED_SALT = 0x7A1  # the validation key is fold_in(key(config.seed), VAL_SEED_SALT): never a training stream
CONDITIONS = ("image", "text", "uncond")


def validation_sums(st, timesteps: tuple, params, frozen, batch, weight, key):
  """{condition: (Σ weight·loss, Σ weight)} over one chunk of held-out rows, each at every t of ``timesteps``.

  The three conditions run as one batch of 3·b rows (one LLM and one DiT call per t) with the same noise, so their
  differences are paired. ``weight`` (b,) is 0 for padding rows."""
  mllm = nnx.merge(st.mllm_def, frozen["mllm"])
  ae = nnx.merge(st.ae_def, frozen["ae"])
  gen = nnx.merge(st.gen_def, params)
  if st.cached:
    x = batch["latent"].astype(jnp.float32)
    tokens = batch["vit_tokens"]
  else:
    x = ae.encode(batch["pixels"])
    tokens = mllm.encode_image_tokens(batch["vit_pixels"])
  b = x.shape[0]
  keep = iomm.sample_keep_mask(jax.random.fold_in(key, 0), (b, len(st.templates.image_positions)), st.mask_ratio)
  n = len(CONDITIONS)
  tile = lambda a: jnp.concatenate([a] * n, axis=0)  # noqa: E731
  is_image = jnp.repeat(jnp.arange(n) == CONDITIONS.index("image"), b)
  drop = jnp.repeat(jnp.arange(n) == CONDITIONS.index("uncond"), b)
  ids, valid, use_image = iomm.condition_ids(
      st.templates, tile(batch["caption_ids"]), tile(batch["caption_len"]), is_image, drop
  )
  h, h_mask = iomm.encode_condition(
      gen.rqa, mllm, st.templates, ids, valid, tile(tokens), tile(keep), use_image, mode=st.condition
  )

  def velocity(x_t, t):
    return gen.velocity(x_t, t, h, h_mask, masked=st.condition == "all")

  def at(k):
    z = jax.random.normal(jax.random.fold_in(key, k + 1), x.shape, jnp.float32).astype(x.dtype)
    t = jnp.full((n * b,), jnp.asarray(timesteps, jnp.float32)[k])
    return loss_lib.per_sample_loss(velocity, tile(x), tile(z), t, **st.loss_kwargs)

  per_sample = jax.lax.map(at, jnp.arange(len(timesteps))).mean(axis=0).reshape(n, b)
  has_caption = (batch["caption_len"] > 0).astype(jnp.float32)
  weights = jnp.stack([weight, weight * has_caption, weight])
  return {c: (jnp.sum(per_sample[i] * weights[i]), jnp.sum(weights[i])) for i, c in enumerate(CONDITIONS)}


class HeldOut:
  """The held-out examples of a run (host numpy, every process holds all of them), or ``examples=None``."""

  def __init__(self, run, workdir: str):
    c = run.config
    source = holdout.val_source(c.data, workdir)
    self.examples = None
    if source is not None:
      self.examples = pipeline.load_examples(c.data, source, c.data.val_num, run.tokenize)

  def __len__(self) -> int:
    return 0 if self.examples is None else len(self.examples["caption_len"])


class Validator:
  """``validator(params) -> {'val_loss_image': …, 'val_loss_text': …, 'val_loss_uncond': …, 'val_seconds': …}``.

  The held-out rows are processed in chunks of the training microbatch (global_batch / grad_accum, which fits in
  memory and divides over the mesh's batch shards); the last chunk is padded with zero-weight rows. The chunking
  depends on the config only, never on the mesh."""

  def __init__(self, run, held: HeldOut):
    if not len(held):
      raise ValueError("Validator: the run has no held-out examples")
    c = run.config
    self.run, self.mesh = run, run.mesh
    self.chunk = c.train.global_batch // c.train.grad_accum
    self.per_process = self.chunk // jax.process_count()
    keys = ["caption_ids", "caption_len", *pipeline.IMAGE_KEYS[bool(c.data.cached)]]
    rows = len(held)
    padded = math.ceil(rows / self.chunk) * self.chunk
    take = np.arange(padded) % rows  # padding repeats real rows (weight 0), so shapes and dtypes stay valid
    self.arrays = {k: held.examples[k][take] for k in keys}
    self.weight = (np.arange(padded) < rows).astype(np.float32)
    self.key = jax.random.fold_in(jax.random.key(c.seed), VAL_SEED_SALT)
    fn = functools.partial(validation_sums, run.statics, tuple(float(t) for t in c.train.eval_timesteps))
    self._sums = jax.jit(fn, out_shardings=parallel.replicated(self.mesh))

  def _local(self, a: np.ndarray, chunk: int) -> np.ndarray:
    """This process's rows of chunk ``chunk`` (process p's devices hold rows [p·b, (p+1)·b), as in training)."""
    start = chunk * self.chunk + jax.process_index() * self.per_process
    return a[start : start + self.per_process]

  def __call__(self, params) -> dict:
    t0 = time.perf_counter()
    totals = {c: [0.0, 0.0] for c in CONDITIONS}
    for i in range(len(self.weight) // self.chunk):
      local = {k: self._local(v, i) for k, v in self.arrays.items()}
      local["weight"] = self._local(self.weight, i)
      batch = parallel.global_batch(local, self.mesh)
      weight = batch.pop("weight")
      sums = jax.device_get(self._sums(params, self.run.frozen, batch, weight, jax.random.fold_in(self.key, i)))
      for c in CONDITIONS:
        totals[c][0] += float(sums[c][0])
        totals[c][1] += float(sums[c][1])
    out = {f"val_loss_{c}": s / w for c, (s, w) in totals.items() if w > 0}
    out["val_seconds"] = time.perf_counter() - t0
    return out
