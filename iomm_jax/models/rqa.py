"""Residual Query Adapter (RQA): learned queries cross-attending over the MLLM input embeddings.

The paper (§2.3) states a 29M-parameter adapter with 256 learned queries; the reconstruction that gives
28.7M is one "QueryFormer" block at width 1536 with a 4x GELU-tanh MLP and parameter-free LayerNorms:

    q  = LN(meta_queries)                      (block 0; later blocks take the previous output)
    kv = LN(c)
    q  = q + MHA(q, kv, key_padding_mask)      (torch.nn.MultiheadAttention layout: fused in_proj)
    q  = LN(q)
    q  = q + fc2(gelu_tanh(fc1(q)))

Its output is appended after c before the frozen LLM runs. Parameter paths mirror the PyTorch reference
(`iomm_jax.convert.torch_rqa.TorchRQA`); `iomm_jax.models.rqa_keys` maps the fused in_proj.

Two ablation kinds (`RQAConfig.kind`, config.model.rqa.kind; the paper's Fig. 2b and 4a): 'metaquery' keeps the
learned queries alone — appended to the MLLM input as they are, with no adapter looking at c (MetaQuery's learnable
queries) — and 'none' adds no queries at all, so the DiT must read the frozen MLLM's raw output at every position
("Raw"; needs config.model.condition='all').
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from iomm_jax.config import RQA_KINDS
from iomm_jax.models.layers import DType, Linear, attention, gelu_tanh, layer_norm
from iomm_jax.models.qwen2 import INTERNVL3_2B_LLM_WIDTH


@dataclasses.dataclass(frozen=True)
class RQAConfig:
  """RQA sizes; defaults are the full-size IOMM adapter (≈28.7M parameters)."""

  dim: int = INTERNVL3_2B_LLM_WIDTH  # width of the MLLM input embeddings (= LLM hidden size)
  num_queries: int = 256  # learned query tokens appended after c
  num_heads: int = 12  # attention heads (head dim = dim // num_heads)
  mlp_ratio: float = 4.0  # FFN hidden = int(dim * mlp_ratio)
  num_layers: int = 1  # stacked query blocks
  eps: float = 1e-6  # LayerNorm epsilon (all LayerNorms are parameter-free)
  attention: str = "auto"  # ours, not the reference's: layers.ATTENTION_IMPLS (config.model.attention)
  kind: str = "rqa"  # RQA_KINDS: 'rqa' (the paper), 'metaquery' (learned queries only), 'none' (no queries)

  def __post_init__(self):
    if self.kind not in RQA_KINDS:
      raise ValueError(f"config.model.rqa.kind={self.kind!r} is not one of {RQA_KINDS}")
    if self.dim % self.num_heads:
      raise ValueError(
          f"RQAConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}; " "pick num_heads that divides dim"
      )
    if self.num_layers < 1 or self.num_queries < 1:
      raise ValueError(
          f"RQAConfig needs num_layers >= 1 and num_queries >= 1, got {self.num_layers}, " f"{self.num_queries}"
      )

  @property
  def mlp_dim(self) -> int:
    return int(self.dim * self.mlp_ratio)

  @property
  def appended_queries(self) -> int:
    """The query tokens the adapter appends to the LLM's input: num_queries, or none for kind 'none'."""
    return 0 if self.kind == "none" else self.num_queries


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class MultiheadCrossAttention(nnx.Module):
  """torch.nn.MultiheadAttention (batch_first, no dropout) as cross-attention.

  `in_proj` is one fused Linear (dim -> 3*dim) whose output splits as [q | k | v], the layout of torch's
  `in_proj_weight`/`in_proj_bias`; queries use the first third, keys/values the rest.
  """

  def __init__(
      self,
      dim: int,
      num_heads: int,
      *,
      attn_implementation: str = "auto",
      dtype: DType = None,
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.dim, self.num_heads, self.attn_implementation = dim, num_heads, attn_implementation
    # torch initialises in_proj with xavier_uniform over the fused (3D, D) matrix and zero bias.
    bound = math.sqrt(6.0 / (dim + 3 * dim))
    self.in_proj = Linear(
        dim,
        3 * dim,
        axes=("embed", "heads"),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_uniform(bound),
        bias_init=jax.nn.initializers.zeros,
        rngs=rngs,
    )
    self.out_proj = Linear(
        dim,
        dim,
        axes=("heads", "embed"),
        dtype=dtype,
        param_dtype=param_dtype,
        bias_init=jax.nn.initializers.zeros,
        rngs=rngs,
    )

  def __call__(self, q: jax.Array, kv: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    d, h = self.dim, self.num_heads
    dtype = self.in_proj.dtype or q.dtype
    w = self.in_proj.kernel[...].astype(dtype)
    b = self.in_proj.bias[...].astype(dtype)
    # Project queries with the q third only and keys/values with the k|v thirds: no wasted matmuls.
    qp = jnp.dot(q.astype(dtype), w[:, :d]) + b[:d]
    kvp = jnp.dot(kv.astype(dtype), w[:, d:]) + b[d:]
    kp, vp = kvp[..., :d], kvp[..., d:]
    split = lambda x: x.reshape(*x.shape[:-1], h, d // h)
    out = attention(split(qp), split(kp), split(vp), mask=key_mask, implementation=self.attn_implementation)
    return self.out_proj(out.reshape(*out.shape[:-2], d))


class QueryMLP(nnx.Module):
  """fc2(gelu_tanh(fc1(x)))."""

  def __init__(self, dim: int, hidden: int, *, dtype: DType = None, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    self.fc1 = Linear(dim, hidden, axes=("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = Linear(hidden, dim, axes=("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu_tanh(self.fc1(x)))


class QueryBlock(nnx.Module):
  """One QueryFormer block; its LayerNorms are parameter-free and compute in fp32."""

  def __init__(self, cfg: RQAConfig, *, dtype: DType = None, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    self.eps = cfg.eps
    self.cross_attn = MultiheadCrossAttention(
        cfg.dim, cfg.num_heads, attn_implementation=cfg.attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.mlp = QueryMLP(cfg.dim, cfg.mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, q: jax.Array, kv: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    q = layer_norm(q, self.eps)
    q = q + self.cross_attn(q, kv, key_mask).astype(q.dtype)
    q = layer_norm(q, self.eps)
    return q + self.mlp(q).astype(q.dtype)


class RQA(nnx.Module):
  """Residual Query Adapter: `(c (B,L,D), key_mask (B,L) True=valid or None) -> queries (B,Q,D)`."""

  # Muon updates the 2-D kernels of these blocks; the meta-queries, biases and norms stay on AdamW.
  HIDDEN_BLOCKS = ("query_blocks",)

  def __init__(
      self,
      cfg: RQAConfig = RQAConfig(),
      *,
      dtype: DType = jnp.float32,
      param_dtype: DType = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.cfg, self.dtype = cfg, dtype
    if cfg.kind != "none":
      # N(0, 1/D): unit-scale rows after the parameter-free LayerNorm either way, small at init.
      self.meta_queries = nnx.Param(
          jax.random.normal(rngs.params(), (cfg.num_queries, cfg.dim), param_dtype) / math.sqrt(cfg.dim),
          axes=(None, "embed"),
      )
    blocks = cfg.num_layers if cfg.kind == "rqa" else 0
    self.query_blocks = nnx.List(
        [QueryBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(blocks)]
    )

  def __call__(self, c: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    if c.ndim != 3 or c.shape[-1] != self.cfg.dim:
      raise ValueError(f"RQA expects c of shape (B, L, {self.cfg.dim}), got {c.shape}")
    if key_mask is not None:
      if key_mask.shape != c.shape[:2]:
        raise ValueError(f"RQA key_mask must have shape {c.shape[:2]} (B, L), got {key_mask.shape}")
      key_mask = key_mask.astype(bool)
    if not self.cfg.appended_queries:
      return jnp.zeros((c.shape[0], 0, c.shape[-1]), self.dtype)
    kv = layer_norm(c.astype(self.dtype), self.cfg.eps)
    q = jnp.broadcast_to(self.meta_queries[...].astype(self.dtype), (c.shape[0],) + self.meta_queries.shape)
    for block in self.query_blocks:
      q = block(q, kv, key_mask)
    return q
