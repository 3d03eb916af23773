"""Next-token loss, the jitted AdamW step and greedy decoding of the tiny MLLM (InternVL with its LM head).

Functional style as the IOMM trainer: the module is split once, params are a pure pytree, `nnx.merge` happens only
inside the jitted functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def splice_per_row(mllm, ids: jax.Array, pixels: jax.Array) -> jax.Array:
  """Token embeddings with each row's own image tokens at its <IMG_CONTEXT> positions.

  Rows differ in where (and whether) their image sits, so each row gathers from its own image's tokens; rows without
  image tokens are left as they are.
  """
  emb = mllm.embed_tokens(ids)
  tokens = mllm.encode_image_tokens(pixels).astype(emb.dtype)  # (B, N, D)
  mask = ids == mllm.cfg.image_token_id
  idx = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, tokens.shape[1] - 1)
  gathered = jnp.take_along_axis(tokens, idx[..., None], axis=1)
  return jnp.where(mask[..., None], gathered, emb)


def logits_of(mllm, ids, valid, pixels):
  """(B, L, vocab) next-token logits, causal over the valid (right-padded) tokens."""
  hidden = mllm.language_model_forward(splice_per_row(mllm, ids, pixels), valid)
  return mllm.logits(hidden).astype(jnp.float32)


def loss_fn(params, graphdef, ids, valid, loss_mask, pixels):
  """Mean cross-entropy over the positions in loss_mask (position t is predicted from logits at t − 1)."""
  mllm = nnx.merge(graphdef, params)
  logits = logits_of(mllm, ids, valid, pixels)[:, :-1]
  target, w = ids[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
  correct = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  return (ce * w).sum() / n, {"token_accuracy": (correct * w).sum() / n}


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay to 10% of the peak, after global-norm clipping."""
  sched = optax.warmup_cosine_decay_schedule(
      0.0,
      train_cfg.lr,
      max(1, train_cfg.warmup_steps),
      max(train_cfg.num_steps, train_cfg.warmup_steps + 1),
      end_value=0.1 * train_cfg.lr,
  )
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=train_cfg.weight_decay),
  )


def make_train_step(graphdef, optimizer):
  """jit(step)(params, opt_state, ids, valid, loss_mask, pixels) → (params, opt_state, metrics); donates the state.
  (The graph definition is closed over: it is not hashable, so it cannot be a static argument.)"""

  def train_step(params, opt_state, ids, valid, loss_mask, pixels):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, ids, valid, loss_mask, pixels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

  return jax.jit(train_step, donate_argnums=(0, 1))


def make_next_token(graphdef):
  """jit(fn)(params, ids, valid, pixels, pos) → the argmax token after position pos − 1, per row."""

  def next_token(params, ids, valid, pixels, pos):
    mllm = nnx.merge(graphdef, params)
    logits = logits_of(mllm, ids, valid, pixels)
    return jnp.argmax(jnp.take(logits, pos - 1, axis=1), axis=-1).astype(ids.dtype)

  return jax.jit(next_token)


def greedy_decode(
    params, next_token, prompt_ids, pixels, *, max_len: int, pad_id: int, end_id: int, max_new: int = 24
) -> list[list[int]]:
  """Greedy answers (token ids, without the end token) to one shared-length batch of prompts.

  prompt_ids: (B, P) int, every row a full prompt of the same length P; pixels: (B, S, S, 3).
  """
  import numpy as np

  b, p = prompt_ids.shape
  ids = np.full((b, max_len), pad_id, np.int32)
  ids[:, :p] = prompt_ids
  valid = np.zeros((b, max_len), bool)
  valid[:, :p] = True
  done = np.zeros((b,), bool)
  out = [[] for _ in range(b)]
  for pos in range(p, min(max_len, p + max_new)):
    tok = np.asarray(next_token(params, jnp.asarray(ids), jnp.asarray(valid), pixels, jnp.int32(pos)))
    for i in range(b):
      if not done[i]:
        if tok[i] == end_id:
          done[i] = True
        else:
          out[i].append(int(tok[i]))
    ids[:, pos], valid[:, pos] = tok, True
    if done.all():
      break
  return out
