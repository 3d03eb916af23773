"""Generation from a built run: text or image conditions → the Euler/CFG sampler → images; PNG grids.

Used by the training loop's sample grids and by the apps (sample, eval_recon, eval_shapes)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from iomm_jax import output_folder, sampling, write_failures
from iomm_jax.models import iomm


def text_condition(tpl: iomm.Templates, tokenize, prompts):
  """Left-aligned template ids/valid (B, L) for text prompts."""
  ids = np.zeros((len(prompts), tpl.length), np.int32)
  lens = np.zeros((len(prompts),), np.int32)
  for i, p in enumerate(prompts):
    t = tokenize(p)
    ids[i, : len(t)] = t
    lens[i] = len(t)
  b = len(prompts)
  cid, valid, use = iomm.condition_ids(
      tpl, jnp.asarray(ids), jnp.asarray(lens), jnp.zeros((b,), bool), jnp.zeros((b,), bool)
  )
  return cid, valid, use


def prompt_notes(tokenize, prompts) -> list[str]:
  """What the user should know about their prompts: truncation (tokens kept of how many) and empty = unconditional."""
  notes = []
  for i, p in enumerate(prompts):
    if not (p or "").strip():
      notes.append(f"note: prompt {i} is empty: an empty prompt means an unconditional sample")
      continue
    full = len(tokenize.processor.text_prompt_ids(p))
    if full > tokenize.max_len:
      notes.append(
          f"note: prompt {i} ({p[:40]!r}...) is {full} template tokens, truncated to the first "
          f"{tokenize.max_len} that the model was trained with (config.data.max_text_tokens; "
          f"{full - tokenize.max_len} tokens dropped)"
      )
  return notes


def image_condition(tpl: iomm.Templates, batch: int):
  """The image template (aux prompt or edit instruction + image tokens) for `batch` samples."""
  ids = jnp.broadcast_to(jnp.asarray(tpl.image_ids), (batch, tpl.length))
  valid = jnp.broadcast_to(jnp.asarray(tpl.image_valid), (batch, tpl.length))
  return ids, valid, jnp.ones((batch,), bool)


@functools.partial(
    jax.jit, static_argnames=("statics", "latent_shape", "steps", "cfg_scale", "condition", "tpl", "shift")
)
def _generate(
    params,
    frozen,
    ids,
    valid,
    use_image,
    vit_pixels,
    rng,
    *,
    statics,
    tpl,
    latent_shape,
    steps,
    cfg_scale,
    condition,
    shift,
):
  gen = nnx.merge(statics.gen_def, params)
  mllm = nnx.merge(statics.mllm_def, frozen["mllm"])
  ae = nnx.merge(statics.ae_def, frozen["ae"])
  tokens = mllm.encode_image_tokens(vit_pixels) if vit_pixels is not None else None
  return sampling.generate(
      gen,
      mllm,
      ae,
      tpl,
      ids,
      valid,
      tokens,
      use_image,
      rng,
      latent_shape=latent_shape,
      steps=steps,
      cfg_scale=cfg_scale,
      condition=condition,
      shift=shift,
  )


def generate(run, params, *, prompts=None, vit_pixels=None, tpl=None, rng, steps=None, cfg_scale=None):
  """Images (B, H, W, 3) in [-1, 1], from text prompts or from preprocessed ViT views (B, S, S, 3).

  The ODE's time grid uses the run's training time shift (config.train.time_shift), so a model trained with a
  shifted schedule is sampled on the same one."""
  cfg = run.config
  steps = cfg.sample.steps if steps is None else int(steps)
  if steps < 1:
    raise ValueError(f"steps={steps}: the sampler needs 1 or more Euler steps")
  tpl = tpl or run.templates
  if prompts is not None:
    ids, valid, use = text_condition(tpl, run.tokenize, prompts)
    vit_pixels = None
  else:
    ids, valid, use = image_condition(tpl, vit_pixels.shape[0])
    vit_pixels = jnp.asarray(vit_pixels)
  return _generate(
      params,
      run.frozen,
      ids,
      valid,
      use,
      vit_pixels,
      rng,
      statics=run.statics,
      tpl=tpl,
      latent_shape=run.latent_shape,
      steps=steps,
      cfg_scale=float(cfg.sample.cfg_scale if cfg_scale is None else cfg_scale),
      condition=cfg.model.condition,
      shift=float(cfg.train.time_shift),
  )


def add_sampling_flags(ap, *, num: int, num_help: str) -> None:
  """The flags every app that samples a run shares (argparse): --num, --steps, --cfg, --seed."""
  ap.add_argument("--num", type=int, default=num, help=num_help)
  ap.add_argument("--steps", type=int, default=None, help="Euler steps (default config.sample.steps)")
  ap.add_argument("--cfg", type=float, default=None, help="guidance scale w (default config.sample.cfg_scale)")
  ap.add_argument("--seed", type=int, default=0)


def check_sampling_flags(ap, args) -> None:
  """One argparse error line (exit status 2) for a --num or --steps no sampler can use."""
  if args.num < 1:
    ap.error(f"--num={args.num}: give 1 or more samples per prompt")
  if args.steps is not None and args.steps < 1:
    ap.error(f"--steps={args.steps}: give 1 or more Euler steps")
  if args.cfg is not None and not math.isfinite(args.cfg):
    ap.error(f"--cfg={args.cfg}: give a finite guidance scale (1 = no guidance)")


def to_uint8(images) -> np.ndarray:
  """Generated pixels in [-1, 1] → uint8, rounded and clipped: the inverse of data/decode.to_signed_unit."""
  return np.asarray(jnp.round((jnp.asarray(images, jnp.float32) + 1.0) * 127.5).clip(0, 255)).astype(np.uint8)


def grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """Rows of uint8 images (n, H, W, 3) → one uint8 image with white padding."""
  h, w = rows[0].shape[1:3]
  cols = max(len(r) for r in rows)
  out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y : y + h, x : x + w] = img
  return out


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
  """Writes uint8 `image` as a PNG at `path`, whole or not at all (an earlier file survives a failed write)."""
  img = Image.fromarray(image)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  with write_failures.writing(path), output_folder.atomic_file(path) as tmp:
    img.save(tmp, format="PNG")
