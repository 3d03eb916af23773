"""The attention kernels behind `layers.attention` (the one entry point every module calls).

- `xla_attention`: explicit fp32 softmax, grouped-query heads without repeated K/V; the reference every other path
  is tested against. Its gradient is JAX's autodiff.
- `saved_probs_attention`: the same forward with a hand-written backward from the saved probabilities
  (dV = PᵀdO, dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O)), dQ = dS·K/√d, dK = dSᵀ·Q/√d), what `'auto'` runs on CPU. XLA:CPU
  compiles autodiff's softmax backward into several fusions that each recompute the exponentials and broadcast
  the row sums; this one reads P once (bench/step.py --compare_torch measures the whole step).
- `splash_attention`: the Pallas splash-attention kernel shipped with JAX (TPU; interpreted on CPU in tests).

All take (B, L, H, D) q and (B, Lk, Hk, D) k/v, and a boolean mask broadcastable to (B, H, Lq, Lk) (True =
attend) or None; query rows with no key return zeros.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def mask4(mask: jax.Array) -> jax.Array:
  """A (B, Lk) key-padding mask as (B, 1, 1, Lk); 4-D masks as they are."""
  mask = mask.astype(bool)
  return mask[:, None, None, :] if mask.ndim == 2 else mask


def zero_empty_rows(out, valid, is_causal, lk):
  """Zero the outputs of query rows with no valid key (the fused paths average over all keys there); `valid` is the
  4-D mask."""
  if is_causal:
    lq = out.shape[1]
    valid = jnp.logical_and(valid, jnp.tril(jnp.ones((lq, lk), bool), lk - lq))
  any_key = jnp.any(valid, axis=-1)  # (B, 1|H, 1|Lq)
  any_key = jnp.transpose(any_key, (0, 2, 1))[..., None]  # (B, 1|Lq, 1|H, 1)
  return jnp.where(any_key, out, jnp.zeros((), out.dtype))


def _subscripts(h: int, hk: int) -> tuple[str, str, str]:
  """einsum subscripts of (queries/outputs, keys/values, probabilities). With fewer KV heads than query heads (GQA)
  the query heads are grouped as (kv head k, group g), so K/V are never repeated; with as many, plain heads h
  (a unit group axis costs XLA:CPU extra layout copies)."""
  return ("bqhd", "bshd", "bhqs") if h == hk else ("bqkgd", "bskd", "bkgqs")


def _split_heads(x, hk):
  """(B, L, H, D) → (B, L, Hk, G, D) for GQA; unchanged otherwise."""
  b, l, h, d = x.shape
  return x if h == hk else x.reshape(b, l, hk, h // hk, d)


def _probs(q, k, mask, is_causal):
  """Softmax probabilities in fp32 over the keys, laid out as `_subscripts` says; rows with no valid key are zero."""
  b, lq, h, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  sq, sk, sp = _subscripts(h, hk)
  logits = jnp.einsum(f"{sq},{sk}->{sp}", _split_heads(q, hk), k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(d))
  if is_causal:
    causal = jnp.tril(jnp.ones((lq, lk), bool), lk - lq)
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (1,) * (4 - mask.ndim) + mask.shape)  # (B|1, 1|H, Lq|1, Lk)
    if h != hk:  # → grouped (B|1, 1|Hk, 1|G, Lq|1, Lk)
      mh = mask.shape[1]
      mask = mask[:, :, None] if mh == 1 else mask.reshape(mask.shape[0], hk, h // hk, *mask.shape[2:])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    # Rows with no valid key (fully padded queries) give zeros, not a uniform average.
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
  return probs


def _weighted_values(probs, v, q_shape):
  sq, sk, sp = _subscripts(q_shape[2], v.shape[2])
  out = jnp.einsum(f"{sp},{sk}->{sq}", probs.astype(v.dtype), v)
  return out.reshape(*q_shape[:3], v.shape[-1])


def xla_attention(q, k, v, mask, is_causal):
  """The reference path: explicit fp32 softmax, also for bf16 inputs (docs/design.md §4 precision)."""
  return _weighted_values(_probs(q, k, mask, is_causal), v, q.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def saved_probs_attention(q, k, v, mask, is_causal):
  """`xla_attention` with a hand-written backward that reuses the forward's probabilities (see the module doc)."""
  return xla_attention(q, k, v, mask, is_causal)


def _saved_probs_fwd(q, k, v, mask, is_causal):
  probs = _probs(q, k, mask, is_causal)
  out = _weighted_values(probs, v, q.shape)
  return out, (q, k, v, mask, probs, out)


def _saved_probs_bwd(is_causal, residuals, d_out):
  del is_causal  # already applied to the saved probabilities
  q, k, v, mask, probs, out = residuals
  d, hk = q.shape[-1], k.shape[2]
  sq, sk, sp = _subscripts(q.shape[2], hk)
  do = _split_heads(d_out, hk)
  dv = jnp.einsum(f"{sp},{sq}->{sk}", probs.astype(do.dtype), do)
  dp = jnp.einsum(f"{sq},{sk}->{sp}", do, v, preferred_element_type=jnp.float32)
  # rowsum(P ∘ dP) = rowsum(dO ∘ O): one pass over (Lq, D) instead of (Lq, Lk).
  f32 = jnp.float32
  delta = jnp.einsum(f"{sq},{sq}->{sp[:-1]}", do.astype(f32), _split_heads(out, hk).astype(f32))[..., None]
  ds = probs * (dp - delta) * (1.0 / math.sqrt(d))
  dq = jnp.einsum(f"{sp},{sk}->{sq}", ds.astype(q.dtype), k).reshape(q.shape)
  dk = jnp.einsum(f"{sp},{sq}->{sk}", ds.astype(k.dtype), _split_heads(q, hk))
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


saved_probs_attention.defvjp(_saved_probs_fwd, _saved_probs_bwd)


SPLASH_BLOCK = 128  # the kernel's sequence tile; sequences are padded to a multiple of it


def splash_attention(q, k, v, mask, is_causal, *, interpret: bool | None = None):
  """The Pallas splash-attention kernel (TPU). Padding is expressed with segment ids: a query attends to keys of
  its own segment (1 = real, 0 = padding), so only (B, Lk) key-padding masks (with or without is_causal) can be
  expressed; GQA runs the multi-query kernel once per KV head."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  if mask is not None and mask.ndim != 2:
    raise ValueError(
        f"attention implementation 'splash' takes a (B, Lk) key-padding mask, got shape {mask.shape}; "
        "use model.attention='auto' for general masks"
    )
  if interpret is None:
    interpret = jax.devices()[0].platform != "tpu"
  b, lq, h, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  pq, pk = -lq % SPLASH_BLOCK, -lk % SPLASH_BLOCK
  Lq, Lk = lq + pq, lk + pk
  kv_valid = jnp.ones((b, lk), bool) if mask is None else mask.astype(bool)
  # A query row with at least one valid key is segment 1 (it sees exactly the valid keys, as the reference); a row
  # with none is segment 0, so it attends padding keys instead of an empty row (the kernel's softmax would divide
  # by zero) and is zeroed below. Under is_causal, row i sees keys ≤ i + lk − lq.
  if is_causal:
    seen = jnp.cumsum(kv_valid, axis=1)[:, jnp.clip(jnp.arange(lq) + lk - lq, 0, lk - 1)]
    q_valid = jnp.logical_and(seen > 0, (jnp.arange(lq) + lk - lq >= 0)[None])
  else:
    q_valid = jnp.broadcast_to(jnp.any(kv_valid, axis=1, keepdims=True), (b, lq))
  kv_seg = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, pk)))
  # Tail rows added to fill the last tile see every valid key (never an empty row, whose NaN would reach dk/dv).
  tail = jnp.broadcast_to(jnp.any(kv_valid, axis=1, keepdims=True), (b, pq))
  q_seg = jnp.concatenate([q_valid, tail], axis=1).astype(jnp.int32)
  if is_causal:
    base = sm.CausalMask((Lq, Lk), offset=Lk - Lq)
  else:
    base = sm.FullMask((Lq, Lk))
  g = h // hk
  blocks = sk.BlockSizes(
      block_q=SPLASH_BLOCK,
      block_kv=SPLASH_BLOCK,
      block_kv_compute=SPLASH_BLOCK,
      block_q_dkv=SPLASH_BLOCK,
      block_kv_dkv=SPLASH_BLOCK,
      block_kv_dkv_compute=SPLASH_BLOCK,
      block_q_dq=SPLASH_BLOCK,
      block_kv_dq=SPLASH_BLOCK,
  )
  kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([base] * g), block_sizes=blocks, interpret=interpret)
  scale = 1.0 / math.sqrt(d)
  # (B, L, H, D) → per batch and KV head: q (G, Lq, D), k/v (Lk, D).
  qh = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, pq), (0, 0), (0, 0)))
  qh = qh.reshape(b, Lq, hk, g, d).transpose(0, 2, 3, 1, 4)
  kh = jnp.pad(k, ((0, 0), (0, pk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  vh = jnp.pad(v, ((0, 0), (0, pk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  seg = sk.SegmentIds(q=q_seg, kv=kv_seg)
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over KV heads
  out = jax.vmap(per_head, in_axes=(0, 0, 0, sk.SegmentIds(0, 0)))(qh, kh, vh, seg)  # over the batch
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, Lq, h, d)[:, :lq]
  return out if mask is None else zero_empty_rows(out, mask4(mask), is_causal, lk)
