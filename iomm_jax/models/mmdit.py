"""The FLUX-style MM-DiT generator of IOMM-B/L, numerically equal to diffusers.FluxTransformer2DModel.

Inputs are already packed 2×2-patch latent tokens (see `iomm_jax.models.latents`). The condition is the MLLM's
hidden states at the query positions (`encoder_hidden_states`, width joint_attention_dim) and their mean
(`pooled_projections`). With `encoder_attention_mask=None` the output equals diffusers'; a (B, L) boolean mask is
our extension: padded text tokens (False) are excluded as attention keys, so their values cannot reach the image.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from iomm_jax.models import layer_stack, layers
from iomm_jax.models.mmdit_blocks import (
    AdaLayerNormContinuous,
    CombinedTimestepTextProjEmbeddings,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from iomm_jax.models.qwen2 import INTERNVL3_2B_LLM_WIDTH
from iomm_jax.models.rope import rope_frequencies

REMAT_POLICIES = tuple(layer_stack.REMAT_POLICIES)
# diffusers config keys that carry no architecture information.
_DIFFUSERS_META = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
_DIFFUSERS_FIELDS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
)


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """diffusers FluxTransformer2DModel's config plus our fields; defaults are IOMM-B (≈1.57B parameters)."""

  patch_size: int = 1  # diffusers' field; only sizes proj_out (p²·out_channels). Tokens come packed.
  in_channels: int = 64  # packed token width: 16 latent channels × 2×2 patch
  out_channels: int | None = None  # None = in_channels
  num_layers: int = 10  # double-stream blocks
  num_single_layers: int = 20  # single-stream blocks
  attention_head_dim: int = 128
  num_attention_heads: int = 12  # width = heads × head_dim = 1536
  joint_attention_dim: int = INTERNVL3_2B_LLM_WIDTH  # MLLM hidden width (encoder_hidden_states)
  pooled_projection_dim: int = INTERNVL3_2B_LLM_WIDTH  # MLLM hidden width (mean-pooled condition)
  guidance_embeds: bool = False  # guidance-distilled variant: not supported
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # RoPE dims per id axis; sums to attention_head_dim
  rope_theta: float = 10000.0  # diffusers hard-codes 10000
  # Ours (not in the diffusers config):
  remat: str = "none"  # per-block rematerialisation: 'none' | 'full' | 'dots_saveable'
  scan_layers: bool = False  # run each block stack as one lax.scan (compile one block, not N)
  zero_init: bool = True  # zero adaLN modulation + final projection (adaLN-Zero); False = torch init
  attention: str = "auto"  # layers.ATTENTION_IMPLS; set from config.model.attention (factory)
  # The fields above that say how the DiT runs or was initialised, not what its weights are: a resume may change
  # them (train/resume_check), and a converted checkpoint does not carry them (weights/components).
  RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("remat", "scan_layers", "zero_init", "attention")

  def __post_init__(self):
    object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
    if self.guidance_embeds:
      raise ValueError(
          "MMDiTConfig.guidance_embeds=True (FLUX-dev guidance distillation) is not supported; "
          "IOMM trains with classifier-free guidance, set guidance_embeds=False"
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"MMDiTConfig.remat={self.remat!r} must be one of {REMAT_POLICIES}")
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(
          f"MMDiTConfig.axes_dims_rope={self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, "
          f"but must equal attention_head_dim={self.attention_head_dim}"
      )
    if any(a % 2 for a in self.axes_dims_rope):
      raise ValueError(f"MMDiTConfig.axes_dims_rope={self.axes_dims_rope}: every entry must be even")
    layers.check_attention(self.attention, "MMDiTConfig.attention")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

  @classmethod
  def from_diffusers(cls, config: dict[str, Any], **ours) -> "MMDiTConfig":
    """From a diffusers FluxTransformer2DModel config dict (its config.json); `ours` sets our extra fields."""
    unknown = sorted(k for k in config if k not in _DIFFUSERS_FIELDS and k not in _DIFFUSERS_META)
    if unknown:
      raise ValueError(
          f"MMDiTConfig.from_diffusers: unknown diffusers config keys {unknown}; "
          "this is not a FluxTransformer2DModel config or needs a newer converter"
      )
    kw = {k: config[k] for k in _DIFFUSERS_FIELDS if k in config}
    return cls(**kw, **ours)

  def to_diffusers(self) -> dict[str, Any]:
    """The diffusers FluxTransformer2DModel config dict (no meta keys)."""
    if self.rope_theta != 10000.0:
      raise ValueError(
          f"MMDiTConfig.rope_theta={self.rope_theta} cannot be expressed in diffusers' "
          "FluxTransformer2DModel (it hard-codes 10000)"
      )
    out = {k: getattr(self, k) for k in _DIFFUSERS_FIELDS}
    out["axes_dims_rope"] = list(self.axes_dims_rope)
    return out


class _KeyStream:
  """Stands in for nnx.Rngs when creating parameters: key i = fold_in(base, i), counted in Python.

  nnx.Rngs bumps a counter Variable per parameter; under nnx.eval_shape / jit that update inspects the
  traced counter's `sharding`, and JAX builds an error message by walking the whole trace each time, which
  makes abstract init of the full model quadratic (≈20 s for IOMM-B). A Python counter avoids it.
  """

  def __init__(self, base_key: jax.Array):
    self.base, self.count = base_key, 0

  def params(self) -> jax.Array:
    self.count += 1
    return jax.random.fold_in(self.base, self.count)


def _run_block(block, carry, temb, cos, sin, key_mask):
  context, hidden = carry
  return block(hidden, context, temb, cos, sin, key_mask)


class MMDiT(nnx.Module):
  """FLUX MM-DiT; parameter paths equal diffusers FluxTransformer2DModel state-dict keys (kernel↔weight)."""

  # The stacks of hidden blocks: their 2-D kernels are the "hidden matrices" Muon updates (train/optimizers.py);
  # embedders, the output layers, biases and norms stay on AdamW.
  HIDDEN_BLOCKS = ("transformer_blocks", "single_transformer_blocks")

  def __init__(self, cfg: MMDiTConfig = MMDiTConfig(), *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    rngs = _KeyStream(rngs.params())
    d, kw = cfg.inner_dim, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    blk = dict(zero_init=cfg.zero_init, attention_impl=cfg.attention, **kw)
    self.time_text_embed = CombinedTimestepTextProjEmbeddings(d, cfg.pooled_projection_dim, **kw)
    self.context_embedder = layers.Linear(cfg.joint_attention_dim, d, axes=(None, "embed"), **kw)
    self.x_embedder = layers.Linear(cfg.in_channels, d, axes=(None, "embed"), **kw)
    self.transformer_blocks = nnx.List(
        [FluxTransformerBlock(d, cfg.num_attention_heads, cfg.attention_head_dim, **blk) for _ in range(cfg.num_layers)]
    )
    self.single_transformer_blocks = nnx.List(
        [
            FluxSingleTransformerBlock(d, cfg.num_attention_heads, cfg.attention_head_dim, **blk)
            for _ in range(cfg.num_single_layers)
        ]
    )
    self.norm_out = AdaLayerNormContinuous(d, zero_init=cfg.zero_init, **kw)
    zero = dict(kernel_init=jax.nn.initializers.zeros, bias_init=jax.nn.initializers.zeros) if cfg.zero_init else {}
    self.proj_out = layers.Linear(d, cfg.output_channels, axes=("embed", None), **kw, **zero)

  def __call__(
      self,
      hidden_states: jax.Array,
      encoder_hidden_states: jax.Array,
      pooled_projections: jax.Array,
      timestep: jax.Array,
      img_ids: jax.Array,
      txt_ids: jax.Array,
      encoder_attention_mask: jax.Array | None = None,
      *,
      return_features: bool = False,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Velocity for packed latent tokens.

    hidden_states (B, N, in_channels); encoder_hidden_states (B, L, joint_attention_dim); pooled_projections
    (B, pooled_projection_dim); timestep (B,) in [0, 1] (×1000 inside, as diffusers); img_ids (N, 3);
    txt_ids (L, 3); encoder_attention_mask (B, L) bool, True = real token, or None. Returns (B, N, C_out) fp32;
    with `return_features` also the image tokens after the double-stream blocks (B, N, inner_dim), fp32, which
    representation alignment (`train.repa_weight`) reads.
    """
    cfg = self.cfg
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
      raise ValueError(
          f"MMDiT: hidden_states must be (B, N, {cfg.in_channels}) packed tokens, " f"got {hidden_states.shape}"
      )
    if encoder_hidden_states.shape[-1] != cfg.joint_attention_dim:
      raise ValueError(
          f"MMDiT: encoder_hidden_states width {encoder_hidden_states.shape[-1]} != "
          f"joint_attention_dim={cfg.joint_attention_dim}"
      )
    n, lc = hidden_states.shape[1], encoder_hidden_states.shape[1]
    if img_ids.shape != (n, len(cfg.axes_dims_rope)) or txt_ids.shape != (lc, len(cfg.axes_dims_rope)):
      raise ValueError(
          f"MMDiT: img_ids {img_ids.shape} / txt_ids {txt_ids.shape} must be (N={n}, "
          f"{len(cfg.axes_dims_rope)}) / (L={lc}, {len(cfg.axes_dims_rope)}) (no batch axis)"
      )

    hidden = self.x_embedder(hidden_states).astype(jnp.float32)
    temb = self.time_text_embed(timestep.astype(jnp.float32) * 1000.0, pooled_projections)
    context = self.context_embedder(encoder_hidden_states).astype(jnp.float32)
    # Position ids are known when tracing (they depend only on the shapes): computed here, the cos/sin tables enter
    # the program as constants. Traced, XLA:CPU fuses cos/sin into every block's RoPE and evaluates them once per
    # rotated element (measured: ≈ 5% of the mid-size CPU step).
    with jax.ensure_compile_time_eval():
      cos, sin = rope_frequencies(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope, cfg.rope_theta)

    key_mask = None
    if encoder_attention_mask is not None:
      if encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
        raise ValueError(
            f"MMDiT: encoder_attention_mask {encoder_attention_mask.shape} must be (B, L) = "
            f"{encoder_hidden_states.shape[:2]}"
        )
      image_keys = jnp.ones((hidden.shape[0], n), bool)
      key_mask = jnp.concatenate([encoder_attention_mask.astype(bool), image_keys], axis=1)

    carry = (context, hidden)
    features = None
    for stack in (self.transformer_blocks, self.single_transformer_blocks):
      carry = layer_stack.run_blocks(
          stack, carry, temb, cos, sin, key_mask, call=_run_block, remat=cfg.remat, scan=cfg.scan_layers
      )
      features = carry[1] if features is None else features
    context, hidden = carry

    out = self.norm_out(hidden, temb)
    out = self.proj_out(out if self.dtype is None else out.astype(self.dtype)).astype(jnp.float32)
    return (out, features.astype(jnp.float32)) if return_features else out
