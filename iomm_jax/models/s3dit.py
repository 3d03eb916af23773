"""Single-stream S3-DiT (the IOMM-XL generator), numerically equal to `diffusers.ZImageTransformer2DModel`.

Time and sign conventions (read this before calling the model)
--------------------------------------------------------------
Ours (docs/design.md §1): x_t = (1 − t)·x + t·z, t = 1 is pure noise, the model predicts v = z − x.
Z-Image (diffusers): its transformer gets τ = 1 − σ (τ = 1 is *clean*: the pipeline passes
(1000 − timestep)/1000 with the scheduler's timestep = 1000·σ) and predicts x − z, which the pipeline
negates (`noise_pred = -noise_pred`) before the flow-matching Euler step. Hence, for the same weights,

    S3DiT(x_t, t, c)  ==  −ZImageTransformer2DModel([x_t], 1 − t, [c])        (t_embedder sees (1 − t)·t_scale)

with latents moved NHWC ↔ (C, 1, H, W). The parity tests check exactly this identity.

Sequence layout (matches diffusers' "basic" mode token for token)
-----------------------------------------------------------------
image tokens (H/p·W/p, row-major) + x_pad_token up to a multiple of 32  →  noise_refiner (with adaLN)
caption tokens (valid ones first) + cap_pad_token up to a multiple of 32 →  context_refiner (no adaLN)
unified = [image segment, caption segment] → layers → final layer on the image tokens → unpatchify.
The pad tokens are attended like any token, as in Z-Image; only slots past a caption's own padded length
are masked out. RoPE positions: caption slot j ↦ (1 + j, 0, 0); image token (h, w) ↦ (Lc + 1, h, w) where
Lc is that caption's padded length; image pad tokens ↦ (0, 0, 0).

Static shapes: latents (B, H, W, C), caption features (B, L, Dc) with a boolean mask (B, L). Valid tokens
may sit anywhere in the row; they are moved to the front in order (a stable sort), so the result equals
diffusers fed `cap_feats[i][cap_mask[i]]`, and the values at masked positions never matter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from iomm_jax.models import layer_stack
from iomm_jax.models.layers import Linear, RMSNorm
from iomm_jax.models.qwen2 import INTERNVL3_2B_LLM_WIDTH
from iomm_jax.models.s3dit_blocks import (
    ADALN_EMBED_DIM,
    SEQ_MULTI_OF,
    FinalLayer,
    TimestepEmbedder,
    ZImageTransformerBlock,
    init_pad_token,
    rope_lookup,
    rope_tables,
    round_up,
)

REMAT_MODES = tuple(layer_stack.REMAT_POLICIES)

# diffusers.ZImageTransformer2DModel's constructor defaults: a config dict that omits a field gets these
# (what diffusers itself would do with that dict). Note cap_feat_dim 2560 here vs our 1536 default.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    siglip_feat_dim=None,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=(32, 48, 48),
    axes_lens=(1024, 512, 512),
)
_TUPLE_FIELDS = ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens")


@dataclasses.dataclass(frozen=True)
class S3DiTConfig:
  """Mirror of the diffusers ZImageTransformer2DModel config; defaults are IOMM-XL (≈6.15B parameters)."""

  all_patch_size: tuple[int, ...] = (2,)
  all_f_patch_size: tuple[int, ...] = (1,)
  in_channels: int = 16  # FLUX VAE latent channels
  dim: int = 3840
  n_layers: int = 30  # main single-stream blocks
  n_refiner_layers: int = 2  # noise_refiner and context_refiner depth each
  n_heads: int = 30
  n_kv_heads: int = 30  # Z-Image ignores it (always full MHA); must equal n_heads
  norm_eps: float = 1e-5
  qk_norm: bool = True
  cap_feat_dim: int = INTERNVL3_2B_LLM_WIDTH  # the MLLM width (Qwen2.5-1.5B), not Z-Image's 2560
  rope_theta: float = 256.0
  t_scale: float = 1000.0
  axes_dims: tuple[int, ...] = (32, 48, 48)  # RoPE dims per axis (caption/frame, h, w); sum = head dim
  axes_lens: tuple[int, ...] = (1024, 512, 512)  # RoPE table lengths per axis
  # --- ours, not in diffusers ---
  remat: str = "none"  # per block: 'none' | 'full' | 'dots_saveable'
  scan_layers: bool = False  # run each block stack as one lax.scan (compile one block, not N)
  attention: str = "auto"  # layers.ATTENTION_IMPLS; set from config.model.attention (factory)
  # How the DiT runs, not what its weights are (as MMDiTConfig.RUNTIME_FIELDS).
  RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("remat", "scan_layers", "attention")

  def __post_init__(self):
    for name in _TUPLE_FIELDS:  # accept lists (JSON) but store tuples so the config stays hashable
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.remat not in REMAT_MODES:
      raise ValueError(f"S3DiTConfig.remat={self.remat!r}; use one of {REMAT_MODES}")
    if self.dim % self.n_heads:
      raise ValueError(f"S3DiTConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}")
    if self.n_kv_heads != self.n_heads:
      raise ValueError(
          f"S3DiTConfig.n_kv_heads={self.n_kv_heads} != n_heads={self.n_heads}: Z-Image (diffusers) "
          "always uses full multi-head attention; set n_kv_heads = n_heads"
      )
    if sum(self.axes_dims) != self.dim // self.n_heads:
      raise ValueError(
          f"S3DiTConfig.axes_dims={self.axes_dims} must sum to the head dim "
          f"{self.dim // self.n_heads} (= dim / n_heads)"
      )
    if len(self.axes_dims) != 3 or len(self.axes_lens) != 3 or any(d % 2 for d in self.axes_dims):
      raise ValueError(
          f"S3DiTConfig.axes_dims={self.axes_dims}, axes_lens={self.axes_lens}: need three axes "
          "(caption/frame, h, w) with even dims"
      )
    if len(self.all_patch_size) != len(self.all_f_patch_size) or not self.all_patch_size:
      raise ValueError(
          f"S3DiTConfig.all_patch_size={self.all_patch_size} and all_f_patch_size="
          f"{self.all_f_patch_size} must be non-empty and of equal length"
      )

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **ours) -> "S3DiTConfig":
    """From a diffusers config dict (config.json); `ours` sets our own fields (remat, attention)."""
    if config.get("siglip_feat_dim") is not None:
      raise ValueError(
          f"diffusers config has siglip_feat_dim={config['siglip_feat_dim']}: the Z-Image Omni "
          "variant (SigLIP branch) is not supported by S3DiT; use a base Z-Image config"
      )
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
      raise ValueError(
          f"diffusers config has fields S3DiTConfig does not know: {unknown}; "
          "is this a ZImageTransformer2DModel config?"
      )
    kw = {k: config.get(k, v) for k, v in DIFFUSERS_DEFAULTS.items() if k != "siglip_feat_dim"}
    return cls(**kw, **ours)

  def to_diffusers(self) -> dict[str, Any]:
    """The ZImageTransformer2DModel constructor kwargs (JSON-friendly lists) for this config."""
    out = {}
    for k in DIFFUSERS_DEFAULTS:
      v = None if k == "siglip_feat_dim" else getattr(self, k)
      out[k] = list(v) if k in _TUPLE_FIELDS else v
    return out


class S3DiT(nnx.Module):
  """Z-Image single-stream DiT with a batched, static-shape interface in OUR flow convention (module doc)."""

  # The stacks of hidden blocks whose 2-D kernels Muon updates (train/optimizers.py); the rest stays on AdamW.
  HIDDEN_BLOCKS = ("noise_refiner", "context_refiner", "layers")

  def __init__(self, cfg: S3DiTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    dim = cfg.dim
    lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    blk = dict(attn_implementation=cfg.attention, **lin)
    self.all_x_embedder = nnx.Dict(
        {
            f"{p}-{f}": Linear(f * p * p * cfg.in_channels, dim, axes=(None, "embed"), **lin)
            for p, f in zip(cfg.all_patch_size, cfg.all_f_patch_size)
        }
    )
    self.all_final_layer = nnx.Dict(
        {
            f"{p}-{f}": FinalLayer(dim, p * p * f * cfg.in_channels, **lin)
            for p, f in zip(cfg.all_patch_size, cfg.all_f_patch_size)
        }
    )
    self.noise_refiner = nnx.List(
        [
            ZImageTransformerBlock(dim, cfg.n_heads, cfg.norm_eps, cfg.qk_norm, modulation=True, **blk)
            for _ in range(cfg.n_refiner_layers)
        ]
    )
    self.context_refiner = nnx.List(
        [
            ZImageTransformerBlock(dim, cfg.n_heads, cfg.norm_eps, cfg.qk_norm, modulation=False, **blk)
            for _ in range(cfg.n_refiner_layers)
        ]
    )
    self.t_embedder = TimestepEmbedder(min(dim, ADALN_EMBED_DIM), param_dtype=param_dtype, rngs=rngs)
    self.cap_embedder = nnx.List(
        [
            RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps, axes=(None,), param_dtype=param_dtype),
            Linear(cfg.cap_feat_dim, dim, axes=(None, "embed"), **lin),
        ]
    )
    self.x_pad_token = init_pad_token(dim, param_dtype)
    self.cap_pad_token = init_pad_token(dim, param_dtype)
    self.layers = nnx.List(
        [
            ZImageTransformerBlock(dim, cfg.n_heads, cfg.norm_eps, cfg.qk_norm, modulation=True, **blk)
            for _ in range(cfg.n_layers)
        ]
    )

  # ------------------------------------------------------------------------------------------- helpers

  def _blocks(self, blocks, x, *consts):
    """Run a block stack (unrolled or scanned, rematerialised) according to cfg.remat / cfg.scan_layers."""
    return layer_stack.run_blocks(blocks, x, *consts, remat=self.cfg.remat, scan=self.cfg.scan_layers)

  def _check_shapes(self, latents, cap_feats, p: int):
    cfg = self.cfg
    if f"{p}-1" not in self.all_x_embedder:
      raise ValueError(
          f"patch_size={p} is not in S3DiTConfig.all_patch_size={cfg.all_patch_size} " "(with f_patch_size 1)"
      )
    if latents.ndim != 4 or latents.shape[-1] != cfg.in_channels:
      raise ValueError(f"latents must be (B, H, W, {cfg.in_channels}) NHWC; got {latents.shape}")
    _, h, w, _ = latents.shape
    if h % p or w % p:
      raise ValueError(f"latent size {h}x{w} is not divisible by patch_size={p}")
    if cap_feats.ndim != 3 or cap_feats.shape[-1] != cfg.cap_feat_dim:
      raise ValueError(f"cap_feats must be (B, L, cap_feat_dim={cfg.cap_feat_dim}); got {cap_feats.shape}")
    sc = round_up(cap_feats.shape[1])
    if sc + 2 > cfg.axes_lens[0] or h // p > cfg.axes_lens[1] or w // p > cfg.axes_lens[2]:
      raise ValueError(
          f"sequence exceeds the RoPE tables axes_lens={cfg.axes_lens}: caption slots {sc} (+2) and "
          f"a {h // p}x{w // p} token grid; shorten the caption / image or raise axes_lens"
      )

  # ------------------------------------------------------------------------------------------- forward

  def __call__(
      self,
      latents: jax.Array,
      timestep: jax.Array,
      cap_feats: jax.Array,
      cap_mask: jax.Array | None = None,
      *,
      patch_size: int | None = None,
      return_features: bool = False,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Velocity v ≈ z − x (float32, (B, H, W, C)) for latents x_t (B, H, W, C) at t (B,) ∈ [0, 1], t = 1 noise.

    cap_feats (B, L, cap_feat_dim) are the condition tokens, cap_mask (B, L) bool (True = valid; None = all).
    With `return_features` also the image tokens (B, ht·wt, dim) fp32 after the first third of the main layers,
    which representation alignment (`train.repa_weight`) reads.
    """
    cfg = self.cfg
    p = patch_size or cfg.all_patch_size[0]
    self._check_shapes(latents, cap_feats, p)
    key = f"{p}-1"
    b, h, w, c = latents.shape
    ht, wt = h // p, w // p
    n = ht * wt
    nx = round_up(n)
    L = cap_feats.shape[1]
    sc = round_up(L)
    dtype = self.dtype

    # Z-Image's clock runs the other way (τ = 1 − t, τ = 1 clean); fp32 timestep embedding.
    tau = 1.0 - jnp.asarray(timestep, jnp.float32).reshape(b)
    adaln = self.t_embedder(tau * cfg.t_scale)

    # Image tokens: patch features ordered (ph, pw, c), tokens row-major over the (ht, wt) grid.
    x = latents.reshape(b, ht, p, wt, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, n, p * p * c)
    x = self.all_x_embedder[key](x.astype(dtype))
    x_pad = jnp.broadcast_to(self.x_pad_token[...].astype(dtype), (b, nx - n, cfg.dim))
    x = jnp.concatenate([x, x_pad], axis=1)

    # Caption tokens: valid ones to the front (stable), zeros elsewhere so masked values never matter.
    if cap_mask is None:
      cap_mask = jnp.ones((b, L), bool)
    cap_mask = cap_mask.astype(bool)
    order = jnp.argsort(~cap_mask, axis=1, stable=True)
    lens = jnp.sum(cap_mask, axis=1, dtype=jnp.int32)
    cap = jnp.take_along_axis(cap_feats, order[:, :, None], axis=1).astype(jnp.float32)
    slot = jnp.arange(sc, dtype=jnp.int32)[None, :]
    is_tok = slot < lens[:, None]
    cap = jnp.pad(cap, ((0, 0), (0, sc - L), (0, 0)))
    cap = jnp.where(is_tok[:, :, None], cap, 0.0)
    cap = self.cap_embedder[1](self.cap_embedder[0](cap))
    # Every caption is padded with cap_pad_token to its own multiple of 32 (attended); the rest is masked.
    cap_len = (lens + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
    live = slot < cap_len[:, None]
    cap = jnp.where(is_tok[:, :, None], cap, self.cap_pad_token[...].astype(dtype)[None])

    # RoPE positions.
    k = jnp.arange(nx, dtype=jnp.int32)
    real = (k < n)[None, :]
    img_pos = jnp.stack(
        [
            jnp.where(real, cap_len[:, None] + 1, 0),
            jnp.broadcast_to(jnp.where(real, k // wt, 0), (b, nx)),
            jnp.broadcast_to(jnp.where(real, k % wt, 0), (b, nx)),
        ],
        axis=-1,
    )
    cap_pos = jnp.zeros((b, sc, 3), jnp.int32).at[:, :, 0].set(slot + 1)
    tables = rope_tables(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)  # static numpy, cached
    cos_x, sin_x = rope_lookup(tables, img_pos)
    cos_c, sin_c = rope_lookup(tables, cap_pos)

    x = self._blocks(self.noise_refiner, x, None, cos_x, sin_x, adaln)
    cap = self._blocks(self.context_refiner, cap, live, cos_c, sin_c, None)

    u = jnp.concatenate([x, cap], axis=1)
    mask = jnp.concatenate([jnp.ones((b, nx), bool), live], axis=1)
    cos_u, sin_u = jnp.concatenate([cos_x, cos_c], axis=1), jnp.concatenate([sin_x, sin_c], axis=1)
    if return_features:  # two runs over the main layers equal one; the split exposes the tokens REPA aligns
      split = len(self.layers) // 3
      u = self._blocks(list(self.layers)[:split], u, mask, cos_u, sin_u, adaln)
      features = u[:, :n].astype(jnp.float32)
      u = self._blocks(list(self.layers)[split:], u, mask, cos_u, sin_u, adaln)
    else:
      u = self._blocks(self.layers, u, mask, cos_u, sin_u, adaln)

    # The final layer is per token: only the real image tokens are needed.
    out = self.all_final_layer[key](u[:, :n], adaln)
    out = out.reshape(b, ht, wt, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    out = -out.astype(jnp.float32)  # Z-Image predicts x − z; ours is z − x.
    return (out, features) if return_features else out
