"""Qwen2 decoder (the LLM of InternVL3), numerically equal to `transformers.Qwen2Model`.

Attribute tree = the transformers module tree (`embed_tokens`, `layers.{i}.self_attn.{q,k,v,o}_proj`,
`layers.{i}.mlp.{gate,up,down}_proj`, `layers.{i}.{input,post_attention}_layernorm`, `norm`), so the default
key rule of `iomm_jax.models.keymap` maps it to the PyTorch state dict with no extra rules.

The LLM is frozen in IOMM but runs forward *and* backward every step (the loss gradient flows through its
activations into the RQA), so each decoder layer can be rematerialised (`remat`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from iomm_jax.models import layer_stack, layers
from iomm_jax.models.layer_stack import REMAT_POLICIES

# The hidden size of InternVL3-2B's LLM (Qwen2.5-1.5B): the width of IOMM's condition, hence the default of every
# module that reads it (the DiTs' condition fields, the RQA), which the factory checks against the loaded MLLM.
INTERNVL3_2B_LLM_WIDTH = 1536


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  """Qwen2 decoder sizes; defaults are the LLM of InternVL3-2B (Qwen2.5-1.5B layout)."""

  vocab_size: int = 151674
  hidden_size: int = INTERNVL3_2B_LLM_WIDTH
  intermediate_size: int = 8960
  num_hidden_layers: int = 28
  num_attention_heads: int = 12
  num_key_value_heads: int = 2
  head_dim: int | None = None  # None: hidden_size // num_attention_heads (as transformers)
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768
  hidden_act: str = "silu"

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"Qwen2Config: num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"Qwen2Config.hidden_act={self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"Qwen2Config: hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
          f"{self.num_attention_heads} (or give head_dim)"
      )
    if self.resolved_head_dim % 2:
      raise ValueError(f"Qwen2Config: the head dimension {self.resolved_head_dim} must be even (RoPE rotates halves)")


ACTIVATIONS = {"silu": jax.nn.silu, "gelu": layers.gelu_exact, "gelu_pytorch_tanh": layers.gelu_tanh}


def rope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """(B, L) positions → cos, sin of shape (B, L, head_dim) in fp32 (transformers' default RoPE)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, L, H, D) rotated with the half-split convention of transformers' `rotate_half`."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class Qwen2Attention(nnx.Module):
  """GQA self-attention with q/k/v bias, no o_proj bias, RoPE."""

  def __init__(
      self,
      cfg: Qwen2Config,
      *,
      attention_impl: str = "auto",
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    d, hd = cfg.hidden_size, cfg.resolved_head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
    self.attention_impl = attention_impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = layers.Linear(d, self.num_heads * hd, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Linear(d, self.num_kv_heads * hd, axes=("embed", "kv"), **kw)
    self.v_proj = layers.Linear(d, self.num_kv_heads * hd, axes=("embed", "kv"), **kw)
    self.o_proj = layers.Linear(self.num_heads * hd, d, use_bias=False, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
    b, l, _ = x.shape
    q = self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = layers.attention(q, k, v, mask=mask, is_causal=True, implementation=self.attention_impl)
    return self.o_proj(o.reshape(b, l, self.num_heads * self.head_dim))


class Qwen2MLP(nnx.Module):
  """SwiGLU feed-forward: down(act(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: Qwen2Config, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = layers.Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.up_proj = layers.Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.down_proj = layers.Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
    self.act = cfg.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(
      self,
      cfg: Qwen2Config,
      *,
      attention_impl: str = "auto",
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.self_attn = Qwen2Attention(cfg, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = Qwen2MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

  def __call__(self, x, cos, sin, mask):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nnx.Module):
  """transformers.Qwen2Model without KV cache: inputs_embeds → last hidden state after the final norm."""

  def __init__(
      self,
      cfg: Qwen2Config,
      *,
      remat: str = "none",
      scan_layers: bool = False,
      attention_impl: str = "auto",
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    self.cfg, self.remat, self.scan_layers, self.dtype = cfg, remat, scan_layers, dtype
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List(
        [
            Qwen2DecoderLayer(cfg, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(cfg.num_hidden_layers)
        ]
    )
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

  def __call__(
      self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None
  ) -> jax.Array:
    """inputs_embeds (B, L, D); attention_mask (B, L) bool (True = real token); position_ids (B, L) int.

    Causal attention restricted to unpadded keys, as transformers' `create_causal_mask` with a 2-D mask.
    Returns (B, L, D) in the compute dtype. Rows of fully padded queries are not meaningful.
    """
    b, l, _ = inputs_embeds.shape
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    cos, sin = rope_cos_sin(position_ids, self.cfg.resolved_head_dim, self.cfg.rope_theta)
    mask = None if attention_mask is None else attention_mask.astype(bool)
    h = inputs_embeds.astype(self.dtype)
    # Frozen weights enter the (optionally rematerialised) per-layer function as inputs, not residuals; the
    # activations inside a layer are recomputed in the backward pass that carries gradients to the RQA.
    h = layer_stack.run_blocks(self.layers, h, cos, sin, mask, remat=self.remat, scan=self.scan_layers)
    return self.norm(h)
