"""PyTorch reference of the Residual Query Adapter; its state dict is the RQA interchange format.

Keys: `meta_queries` (Q, D), `query_blocks.{i}.cross_attn.{in_proj_weight,in_proj_bias,out_proj.weight,
out_proj.bias}` (torch.nn.MultiheadAttention, batch_first), `query_blocks.{i}.mlp.{fc1,fc2}.{weight,bias}`.
LayerNorms are parameter-free, so they have no keys. Only tests and `convert verify` import this (torch).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TorchQueryMLP(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TorchQueryBlock(nn.Module):

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float):
    super().__init__()
    self.norm_q = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
    self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
    self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
    self.mlp = TorchQueryMLP(dim, mlp_dim)

  def forward(self, q, kv, key_padding_mask):
    q = self.norm_q(q)
    q = q + self.cross_attn(q, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
    q = self.norm1(q)
    return q + self.mlp(q)


class TorchRQA(nn.Module):
  """The RQA in PyTorch; forward(c (B,L,D), key_mask (B,L) bool True=valid or None) -> (B,Q,D)."""

  def __init__(
      self,
      dim: int = 1536,
      num_queries: int = 256,
      num_heads: int = 12,
      mlp_ratio: float = 4.0,
      num_layers: int = 1,
      eps: float = 1e-6,
  ):
    super().__init__()
    self.config = dict(
        dim=dim, num_queries=num_queries, num_heads=num_heads, mlp_ratio=mlp_ratio, num_layers=num_layers, eps=eps
    )
    self.meta_queries = nn.Parameter(torch.randn(num_queries, dim) / dim**0.5)
    self.norm_k = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
    self.query_blocks = nn.ModuleList(
        [TorchQueryBlock(dim, num_heads, int(dim * mlp_ratio), eps) for _ in range(num_layers)]
    )

  def forward(self, c, key_mask=None):
    kv = self.norm_k(c)
    q = self.meta_queries.unsqueeze(0).expand(c.shape[0], -1, -1)
    key_padding_mask = None if key_mask is None else ~key_mask.bool()
    for block in self.query_blocks:
      q = block(q, kv, key_padding_mask)
    return q
