"""IOMM composition: condition templates, masked self-conditioning through RQA + frozen MLLM, the DiT velocity.

One training sample's condition (docs/design.md §1):
  image-only:  c = template(aux prompt, <img> c_img ⊙ keep </img>)   keep ~ Bernoulli(1 − r) per image token
  pair:        c = template(caption)
  dropped:     c = template("")                                      (probability p_uncond, for CFG)
  q = RQA(c);  h = LLM(concat(c, q)) at the query positions (or every position, `condition='all'`)
Sequences are left-padded to one static length so the RQA queries always sit at the end; positions are
contiguous over the valid tokens (cumsum of the mask), as if the padding were not there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iomm_jax.models import dit_families
from iomm_jax.models.repa import RepaProjector
from iomm_jax.models.rqa import RQA, RQAConfig


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Templates:
  """Host-side token templates, all left-padded to `length` (static under jit)."""

  length: int
  pad_id: int
  image_ids: np.ndarray  # (length,) aux prompt + <img> N×<IMG_CONTEXT> </img>
  image_valid: np.ndarray  # (length,) bool
  image_positions: np.ndarray  # (N,) where the image tokens go in image_ids
  uncond_ids: np.ndarray  # (length,) the empty-prompt template
  uncond_valid: np.ndarray


def _left_pad(ids, length, pad_id, what):
  if len(ids) > length:
    raise ValueError(
        f"the {what} template has {len(ids)} tokens, more than the condition length {length}; "
        "raise config.data.max_text_tokens or shorten config.model.mllm.aux_prompt"
    )
  out = np.full((length,), pad_id, np.int32)
  out[length - len(ids) :] = ids
  valid = np.zeros((length,), bool)
  valid[length - len(ids) :] = True
  return out, valid


def make_templates(processor, aux_prompt: str, max_text_tokens: int) -> Templates:
  """Build the fixed image-only and empty-prompt templates from the processor (tokenizer + chat template)."""
  image = processor.image_prompt_ids(aux_prompt)
  length = max(len(image), int(max_text_tokens))
  image_ids, image_valid = _left_pad(image, length, processor.pad_id, "image-conditioning")
  positions = np.nonzero(image_ids == processor.image_token_id)[0].astype(np.int32)
  if len(positions) != processor.num_image_tokens:
    raise ValueError(f"image template holds {len(positions)} image tokens, expected {processor.num_image_tokens}")
  uncond_ids, uncond_valid = _left_pad(processor.text_prompt_ids(""), length, processor.pad_id, "empty-prompt")
  return Templates(length, processor.pad_id, image_ids, image_valid, positions, uncond_ids, uncond_valid)


class Tokenize:
  """caption → template token ids of at most `max_len`, truncating the caption, never the template.

  A class (not a closure) so Grain worker processes can pickle it.
  """

  def __init__(self, processor, max_len: int):
    self.processor, self.max_len = processor, int(max_len)
    empty = processor.text_prompt_ids("")
    probe = processor.text_prompt_ids("red")
    prefix = 0
    while prefix < len(empty) and empty[prefix] == probe[prefix]:
      prefix += 1
    self.suffix = len(empty) - prefix

  def __call__(self, text: str) -> list[int]:
    return self.with_truncation(text)[0]

  def with_truncation(self, text: str) -> tuple[list[int], bool]:
    """(ids, whether the caption was cut to fit max_len)."""
    ids = list(self.processor.text_prompt_ids(text or ""))
    if len(ids) <= self.max_len:
      return ids, False
    return ids[: self.max_len - self.suffix] + ids[len(ids) - self.suffix :], True


def condition_ids(tpl: Templates, caption_ids, caption_len, is_image, drop):
  """Per-sample token ids and validity: image template, left-aligned caption template, or the empty prompt.

  caption_ids: (B, T) right-padded template ids from the pipeline; caption_len: (B,).
  Returns ids (B, L), valid (B, L), use_image (B,) — whether the image tokens are spliced in.
  """
  b, t = caption_ids.shape
  length = tpl.length
  idx = jnp.arange(length)[None, :] - (length - caption_len)[:, None]
  cap_valid = idx >= 0
  cap = jnp.take_along_axis(caption_ids, jnp.clip(idx, 0, t - 1), axis=1)
  cap = jnp.where(cap_valid, cap, tpl.pad_id)
  ids = jnp.where(is_image[:, None], jnp.asarray(tpl.image_ids)[None], cap)
  valid = jnp.where(is_image[:, None], jnp.asarray(tpl.image_valid)[None], cap_valid)
  ids = jnp.where(drop[:, None], jnp.asarray(tpl.uncond_ids)[None], ids)
  valid = jnp.where(drop[:, None], jnp.asarray(tpl.uncond_valid)[None], valid)
  return ids.astype(jnp.int32), valid, jnp.logical_and(is_image, jnp.logical_not(drop))


def sample_keep_mask(rng, shape, mask_ratio: float):
  """One Bernoulli(1 − r) per image token: True = kept, False = zeroed (position kept)."""
  return jax.random.bernoulli(rng, 1.0 - mask_ratio, shape)


def splice_image_tokens(emb, tpl: Templates, image_tokens, keep, use_image):
  """Put c_img ⊙ keep at the template's image positions of the samples with use_image; others untouched.

  Masked tokens become zero vectors in place (no learned mask token, positions kept), as the paper describes.
  """
  pos = jnp.asarray(tpl.image_positions)
  tokens = image_tokens.astype(emb.dtype) * keep[..., None].astype(emb.dtype)
  return emb.at[:, pos].set(jnp.where(use_image[:, None, None], tokens, emb[:, pos]))


# What the DiT reads of the LLM's output: 'query' the adapter's query positions (the paper), 'all' every position.
CONDITION_MODES = ("query", "all")


def condition_lengths(template_length: int, num_queries: int, mode: str) -> tuple[int, int]:
  """(the LLM's sequence, the condition h's length) as `encode_condition` builds them: the template (text or image
  prompt, padded to `template_length`) followed by the queries; h is the queries alone ('query') or every position."""
  llm = template_length + num_queries
  return llm, (num_queries if mode == "query" else llm)


def encode_condition(rqa: RQA, mllm, tpl: Templates, ids, valid, image_tokens, keep, use_image, *, mode: str = "query"):
  """The generator condition h (B, Lh, D) and its validity mask (B, Lh).

  image_tokens: (B, N, D) ViT+projector tokens (or None for text-only batches); keep: (B, N) bool; mode: one of
  CONDITION_MODES (config.model.condition).
  Gradients reach the RQA through the frozen LLM's activations; the LLM's weights are constants here.
  """
  if mode not in CONDITION_MODES:
    raise ValueError(f"config.model.condition={mode!r}: expected one of {CONDITION_MODES}")
  emb = mllm.embed_tokens(ids)
  if image_tokens is not None:
    emb = splice_image_tokens(emb, tpl, image_tokens, keep, use_image)
  queries = rqa(emb, valid)
  seq = jnp.concatenate([emb, queries.astype(emb.dtype)], axis=1)
  mask = jnp.concatenate([valid, jnp.ones(queries.shape[:2], bool)], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
  hidden = mllm.language_model_forward(seq, mask, positions)
  if mode == "query":
    q = queries.shape[1]
    return hidden[:, -q:], jnp.ones((hidden.shape[0], q), bool)
  return hidden, mask


PREDICTIONS = ("v", "x")
X_PRED_T_MIN = 0.05  # x-prediction: v = (x_t − x̂) / max(t, X_PRED_T_MIN), so v stays bounded near the data end
REPA_HEAD = "repa"  # the generator's params key of REPA's head (Generator.repa): used by the loss only


class Generator(nnx.Module):
  """The trainable part of IOMM: the diffusion transformer and the Residual Query Adapter.

  prediction: what the DiT's output means. 'v' (FLUX, the paper): the velocity z − x itself. 'x': the clean latent x̂,
  turned into v = (x_t − x̂)/max(t, X_PRED_T_MIN), so the loss and the sampler are unchanged. A DiT whose tokens
  carry more values than its width (pixel space with large patches) cannot pass the noise through to predict v;
  predicting the clean image, which lies on a low-dimensional manifold, it can.

  repa_dim: when > 0, a representation-alignment head (`models/repa.py`) from the DiT's inner image tokens to
  repa_dim (the MLLM width), trained with the generator and used by the loss only.
  """

  def __init__(
      self,
      dit_kind: str,
      dit_cfg,
      rqa_cfg: RQAConfig,
      *,
      prediction: str = "v",
      repa_dim: int = 0,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    if prediction not in PREDICTIONS:
      raise ValueError(f"config.model.prediction={prediction!r}: expected one of {PREDICTIONS}")
    self.dit_kind, self.prediction = dit_kind, prediction
    family = dit_families.family(dit_kind)
    self.dit = family.module(dit_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.rqa = RQA(rqa_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.repa = (  # REPA_HEAD
        RepaProjector(family.feature_width(dit_cfg), repa_dim, param_dtype=param_dtype, rngs=rngs) if repa_dim else None
    )

  def velocity(self, x_t, t, h, h_mask, *, masked: bool = False):
    """Predicted velocity (z − x) for latents x_t (B, H, W, C) at times t (B,) given condition h (B, L, D).

    `masked`: pass h_mask to the DiT (needed for condition='all'; 'query' conditions have no padding).
    """
    out = dit_families.family(self.dit_kind).predict(self.dit, x_t, t, h, h_mask, masked)
    return self._to_velocity(x_t, t, out)

  def velocity_and_features(self, x_t, t, h, h_mask, *, masked: bool = False):
    """(velocity as `velocity`, the DiT's inner image tokens (B, h, w, D)) from one forward pass."""
    out, feats = dit_families.family(self.dit_kind).predict(self.dit, x_t, t, h, h_mask, masked, features=True)
    return self._to_velocity(x_t, t, out), feats

  def _to_velocity(self, x_t, t, out):
    if self.prediction == "x":
      tb = jnp.maximum(t, X_PRED_T_MIN).reshape((-1,) + (1,) * (x_t.ndim - 1)).astype(jnp.float32)
      return ((x_t.astype(jnp.float32) - out.astype(jnp.float32)) / tb).astype(out.dtype)
    return out
