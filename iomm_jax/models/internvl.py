"""InternVL3 (frozen MLLM of IOMM) in Flax NNX, numerically equal to `transformers.InternVLModel`.

ViT → drop CLS → pixel shuffle (downsample_ratio) → projector (LayerNorm, Linear, GELU, Linear) gives the image
tokens; they replace the `<IMG_CONTEXT>` positions of the token embeddings; the Qwen2 LLM returns the last hidden
states after its final norm. The attribute tree equals InternVLModel's state-dict keys (`vision_tower.…`,
`multi_modal_projector.…`, `language_model.…`), plus `lm_head` only when `with_lm_head` (never needed by IOMM).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iomm_jax.models import layers
from iomm_jax.models.internvit import InternViT, InternViTConfig
from iomm_jax.models.qwen2 import REMAT_POLICIES, Qwen2Config, Qwen2Model


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
  """InternVL3 sizes; defaults = OpenGVLab/InternVL3-2B-hf."""

  vision: InternViTConfig = dataclasses.field(default_factory=InternViTConfig)
  text: Qwen2Config = dataclasses.field(default_factory=Qwen2Config)
  downsample_ratio: float = 0.5
  projector_hidden_act: str = "gelu"
  projector_layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default, as transformers builds it
  image_token_id: int = 151667
  remat: str = "none"  # LLM layers: 'none' | 'full' | 'dots_saveable'
  scan_layers: bool = False  # LLM layers as one lax.scan (compile one layer, not N)
  attention: str = "auto"  # layers.ATTENTION_IMPLS (config.model.attention)
  with_lm_head: bool = False  # build/load lm_head.weight (IOMM only needs hidden states)

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"InternVLConfig.remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    inv = 1.0 / self.downsample_ratio
    if abs(inv - round(inv)) > 1e-6:
      raise ValueError(f"InternVLConfig.downsample_ratio={self.downsample_ratio}: 1/ratio must be an integer")
    if (self.vision.grid * self.downsample_ratio) % 1:
      raise ValueError(
          f"InternVLConfig: the ViT grid {self.vision.grid} times downsample_ratio "
          f"{self.downsample_ratio} is not an integer"
      )
    if self.projector_hidden_act not in _ACT:
      raise ValueError(
          f"InternVLConfig.projector_hidden_act={self.projector_hidden_act!r}; " f"supported: {sorted(_ACT)}"
      )

  @property
  def shuffle_factor(self) -> int:
    """Channels are multiplied by shuffle_factor**2 by the pixel shuffle (2 for ratio 0.5)."""
    return int(round(1.0 / self.downsample_ratio))

  @property
  def num_image_tokens(self) -> int:
    """Image tokens per image at the configured ViT size (256 for 448² with patch 14, ratio 0.5)."""
    return int(self.vision.grid * self.downsample_ratio) ** 2


_ACT = {"gelu": layers.gelu_exact, "gelu_pytorch_tanh": layers.gelu_tanh, "silu": jax.nn.silu}


def pixel_shuffle(x: jax.Array, scale_factor: float) -> jax.Array:
  """transformers' InternVLModel.pixel_shuffle on (B, W, H, C): the same view/permute sequence, row-major."""
  b, w, h, c = x.shape
  if (h * scale_factor) % 1 or (w * scale_factor) % 1:
    raise ValueError(f"pixel_shuffle: grid {w}x{h} is not divisible by 1/{scale_factor}")
  x = x.reshape(b, w, int(h * scale_factor), int(c / scale_factor))
  x = x.transpose(0, 2, 1, 3)
  x = x.reshape(b, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor**2)))
  return x.transpose(0, 2, 1, 3)


class InternVLMultiModalProjector(nnx.Module):
  """LayerNorm(D_vit·s²) → Linear → GELU → Linear to the LLM width."""

  def __init__(self, cfg: InternVLConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    d_in = cfg.vision.hidden_size * cfg.shuffle_factor**2
    d_out = cfg.text.hidden_size
    self.act = cfg.projector_hidden_act
    self.layer_norm = layers.LayerNorm(d_in, eps=cfg.projector_layer_norm_eps, axes=(None,), param_dtype=param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = layers.Linear(d_in, d_out, axes=(None, "embed"), **kw)
    self.linear_2 = layers.Linear(d_out, d_out, axes=(None, "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(_ACT[self.act](self.linear_1(self.layer_norm(x))))


class InternVL(nnx.Module):
  """transformers.InternVLModel without generation: ViT tokens, embeddings, splice, and the LLM pass."""

  def __init__(
      self,
      cfg: InternVLConfig = InternVLConfig(),
      *,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.cfg, self.dtype = cfg, dtype
    kw = dict(attention_impl=cfg.attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vision_tower = InternViT(cfg.vision, **kw)
    self.multi_modal_projector = InternVLMultiModalProjector(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.language_model = Qwen2Model(cfg.text, remat=cfg.remat, scan_layers=cfg.scan_layers, **kw)
    self.lm_head = (
        layers.Linear(
            cfg.text.hidden_size,
            cfg.text.vocab_size,
            use_bias=False,
            axes=("embed", "vocab"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if cfg.with_lm_head
        else None
    )

  # -- image path (independent of trainable weights: can be cached offline) --------------------------------
  def vision_features(self, pixel_values: jax.Array) -> jax.Array:
    """(B, H, W, 3) → pixel-shuffled ViT features (B, N_img, D_vit·s²), before the projector."""
    feats = self.vision_tower(pixel_values)[:, 1:, :]  # vision_feature_select_strategy='default'
    b, n, c = feats.shape
    side = int(round(n**0.5))
    if side * side != n:
      raise ValueError(f"InternVL: {n} patch tokens do not form a square grid; use a square image")
    feats = pixel_shuffle(feats.reshape(b, side, side, c), self.cfg.downsample_ratio)
    return feats.reshape(b, -1, feats.shape[-1])

  def encode_image_tokens(self, pixel_values: jax.Array) -> jax.Array:
    """(B, H, W, 3) normalised NHWC pixels → projected image tokens (B, N_img, D_text)."""
    return self.multi_modal_projector(self.vision_features(pixel_values))

  # -- text path -------------------------------------------------------------------------------------------
  def embed_tokens(self, ids: jax.Array) -> jax.Array:
    """(B, L) token ids → (B, L, D_text) embeddings in the compute dtype."""
    return self.language_model.embed_tokens(ids)

  def splice_image_tokens(self, embeds: jax.Array, ids: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """Put image tokens at the positions where ids == image_token_id (transformers' masked_scatter order:
    row-major over (B, L), consuming image_tokens flattened over (B, N)).

    With concrete inputs a count mismatch raises ValueError; under jit the count must already be right.
    """
    mask = ids == self.cfg.image_token_id
    flat = image_tokens.reshape(-1, image_tokens.shape[-1]).astype(embeds.dtype)
    if not isinstance(mask, jax.core.Tracer):
      n_pos = int(np.asarray(mask).sum())
      if n_pos != flat.shape[0]:
        raise ValueError(
            f"splice_image_tokens: {n_pos} image-token positions (id {self.cfg.image_token_id}) "
            f"but {flat.shape[0]} image tokens were given"
        )
    idx = jnp.cumsum(mask.reshape(-1)) - 1
    gathered = jnp.take(flat, jnp.clip(idx, 0, flat.shape[0] - 1), axis=0).reshape(embeds.shape)
    return jnp.where(mask[..., None], gathered, embeds)

  def language_model_forward(
      self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None
  ) -> jax.Array:
    """(B, L, D) embeddings → last hidden states after the final norm; causal + key-padding mask
    (attention_mask (B, L) bool, True = real token); position_ids (B, L) default 0..L-1."""
    return self.language_model(inputs_embeds, attention_mask, position_ids)

  def __call__(
      self,
      input_ids: jax.Array,
      pixel_values: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      position_ids: jax.Array | None = None,
  ) -> jax.Array:
    """The whole InternVLModel forward: embed, splice image tokens (if pixels), LLM → last hidden state."""
    embeds = self.embed_tokens(input_ids)
    if pixel_values is not None:
      embeds = self.splice_image_tokens(embeds, input_ids, self.encode_image_tokens(pixel_values))
    return self.language_model_forward(embeds, attention_mask, position_ids)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """lm_head(hidden); only with cfg.with_lm_head."""
    if self.lm_head is None:
      raise ValueError("InternVL.logits needs InternVLConfig(with_lm_head=True)")
    return self.lm_head(hidden)
