"""Analytic FLOPs of one training step, per component (the MFU metric, `--dry_run`, bench/step.py).

2 FLOPs per multiply-add; matmuls and attention (QKᵀ and PV, counted over the full Lq × Lk rectangle, as the
'xla' and 'auto' paths compute it, causal or not) only: norms, activations, softmax and the optimizer are left out.
Forward FLOPs per image come from each architecture's shapes; the backward pass is derived per component:

- DiT, RQA and the REPA head when `train.repa_weight` > 0 (trainable): backward = 2 × forward (a gradient for the weights and one for the activations).
- LLM (frozen, but the gradient flows through it to the RQA): backward = 1 × forward for its weight matmuls (the
  activation gradient only) + 2 × forward for attention (dQ, dK and dV all depend on activations); with remat on,
  the forward runs again in the backward pass — reported as `remat`, separately from the model FLOPs.
- ViT + projector, VAE encoder: forward only, and only when features are not cached (nothing upstream trains).

MFU uses `model` FLOPs (forward + backward, no recompute), as the PaLM paper defines it; `hardware` adds remat.
"""

from __future__ import annotations


from iomm_jax.models.internvl import InternVLConfig
from iomm_jax.models import dit_families, factory, iomm, repa, s3dit_blocks
from iomm_jax.models.mmdit_blocks import TIME_PROJ_DIM


def _attn(lq: int, lk: int, width: int) -> float:
  """QKᵀ and PV for all heads: 2·2·Lq·Lk·(heads·head_dim)."""
  return 4.0 * lq * lk * width


def mmdit_forward(cfg, image_tokens: int, cond_tokens: int) -> float:
  """FLUX MM-DiT forward for one image: N image tokens, L condition tokens (models/mmdit*.py)."""
  d, n, l = cfg.inner_dim, image_tokens, cond_tokens
  s = n + l
  f = 2.0 * n * cfg.in_channels * d + 2.0 * l * cfg.joint_attention_dim * d  # x / context embedders
  f += 2.0 * (TIME_PROJ_DIM * d + d * d) + 2.0 * (cfg.pooled_projection_dim * d + d * d)  # time + pooled embeds
  # Double block: adaLN (6d per stream, per image), q/k/v 3d², out d², MLP 8d² on both streams, joint attention.
  f += cfg.num_layers * (2.0 * 2 * d * 6 * d + 2.0 * s * 12 * d * d + _attn(s, s, d))
  # Single block: adaLN 3d, q/k/v 3d² + MLP-in 4d² in one pass, out (d + 4d)·d, attention.
  f += cfg.num_single_layers * (2.0 * d * 3 * d + 2.0 * s * 12 * d * d + _attn(s, s, d))
  f += 2.0 * d * 2 * d + 2.0 * n * d * cfg.output_channels  # norm_out, proj_out
  return f


def s3dit_forward(cfg, image_tokens: int, cond_tokens: int) -> float:
  """Z-Image S3-DiT forward for one image (models/s3dit*.py): refiners per stream, then the joint blocks."""
  d, n, l = cfg.dim, image_tokens, cond_tokens
  per_token = 4 * d * d + 3 * d * s3dit_blocks.ffn_hidden(d)  # q/k/v/out + SwiGLU
  t_width = min(d, s3dit_blocks.ADALN_EMBED_DIM)
  adaln = 4 * d * t_width

  def blocks(count, tokens, modulated):
    return count * (2.0 * tokens * per_token + _attn(tokens, tokens, d) + (2.0 * adaln if modulated else 0.0))

  patch = cfg.in_channels * cfg.all_patch_size[0] ** 2  # values a token carries in and out
  f = 2.0 * n * patch * d + 2.0 * l * cfg.cap_feat_dim * d + 2.0 * n * d * patch
  f += 2.0 * (s3dit_blocks.FREQ_EMBED_DIM * s3dit_blocks.T_MLP_HIDDEN + s3dit_blocks.T_MLP_HIDDEN * t_width)  # t MLP
  f += blocks(cfg.n_refiner_layers, n, True) + blocks(cfg.n_refiner_layers, l, False)
  return f + blocks(cfg.n_layers, n + l, True)


def rqa_forward(cfg, context_tokens: int) -> float:
  """RQA forward for one image: Q queries cross-attend to L context tokens, then the MLP on the queries (kinds
  'metaquery' and 'none' have no query blocks: 0)."""
  if cfg.kind != "rqa":
    return 0.0
  d, q, l = cfg.dim, cfg.num_queries, context_tokens
  hidden = cfg.mlp_dim
  per_layer = 2.0 * q * d * d + 2.0 * l * d * 2 * d + 2.0 * q * d * d + _attn(q, l, d) + 2.0 * q * 2 * d * hidden
  return cfg.num_layers * per_layer


def repa_forward(dit_width: int, mllm_width: int, image_tokens: int) -> float:
  """The REPA head (models/repa.py) on one image's DiT tokens: three Linear layers, DiT width → hidden → hidden →
  MLLM width."""
  hidden = repa.hidden_width(dit_width)
  return 2.0 * image_tokens * (dit_width * hidden + hidden * hidden + hidden * mllm_width)


def llm_forward(cfg, tokens: int) -> tuple[float, float]:
  """Qwen2 forward for one sequence: (weight matmuls, attention)."""
  d, hd = cfg.hidden_size, cfg.resolved_head_dim
  qo = cfg.num_attention_heads * hd
  kv = cfg.num_key_value_heads * hd
  dense = 2.0 * tokens * (2 * d * qo + 2 * d * kv + 3 * d * cfg.intermediate_size)
  return cfg.num_hidden_layers * dense, cfg.num_hidden_layers * _attn(tokens, tokens, qo)


def vit_forward(cfg: InternVLConfig) -> float:
  """InternViT on one tile (patches + CLS), then pixel shuffle and the MLP projector to the LLM width."""
  v = cfg.vision
  patches = v.grid**2
  t = patches + 1
  d = v.hidden_size
  f = 2.0 * patches * v.num_channels * v.patch_size**2 * d
  f += v.num_hidden_layers * (2.0 * t * (4 * d * d + 2 * d * v.intermediate_size) + _attn(t, t, d))
  d_in = d * cfg.shuffle_factor**2
  return f + 2.0 * cfg.num_image_tokens * (d_in * cfg.text.hidden_size + cfg.text.hidden_size**2)


def vae_encoder_forward(cfg, resolution: int) -> float:
  """FLUX VAE encoder on one image (convolutions + the mid-block attention), models/flux_vae.py."""
  ch = list(cfg.block_out_channels)
  side = resolution
  f = 2.0 * side * side * 9 * cfg.in_channels * ch[0]  # conv_in
  prev = ch[0]
  for i, c in enumerate(ch):
    for j in range(cfg.layers_per_block):
      cin = prev if j == 0 else c
      f += 2.0 * side * side * 9 * (cin * c + c * c) + (2.0 * side * side * cin * c if cin != c else 0.0)
    prev = c
    if i < len(ch) - 1:
      side //= 2
      f += 2.0 * side * side * 9 * c * c  # stride-2 downsample
  c = ch[-1]
  hw = side * side
  f += 2 * (2.0 * hw * 9 * 2 * c * c)  # two mid resnets
  if cfg.mid_block_add_attention:
    f += 2.0 * hw * 4 * c * c + _attn(hw, hw, c)
  return f + 2.0 * hw * 9 * c * 2 * cfg.latent_channels  # conv_out (mean, logvar)


# Forward FLOPs per image of each DiT family (models/dit_families.DIT_FAMILIES); tests/test_flops.py checks that every
# registered family has an entry.
DIT_FORWARD = {"mmdit": mmdit_forward, "s3dit": s3dit_forward}


def step_flops(run) -> dict:
  """FLOPs of one training step of `run` (train/builder.Run), per component and in total.

  Keys: per_image {component: {'forward', 'backward'}}, remat_per_image (LLM recompute), model (forward + backward
  for the global batch: the MFU numerator), remat, hardware (model + remat).
  """

  c = run.config
  mcfg = run.mcfg
  width = factory.mllm_width(mcfg)
  dit_cfg = factory.dit_config(c, width)
  tokens = image_tokens(run)
  rqa_cfg = factory.rqa_config(c, width)
  q = rqa_cfg.appended_queries
  ctx = run.templates.length
  llm_tokens, cond_tokens = iomm.condition_lengths(ctx, q, c.model.condition)
  dit = DIT_FORWARD[c.model.dit.kind](dit_cfg, tokens, cond_tokens)
  rqa = rqa_forward(rqa_cfg, ctx)
  llm_dense, llm_attn = llm_forward(mcfg.text, llm_tokens)
  per_image = {
      "dit": {"forward": dit, "backward": 2.0 * dit},
      "rqa": {"forward": rqa, "backward": 2.0 * rqa},
      "llm": {"forward": llm_dense + llm_attn, "backward": llm_dense + 2.0 * llm_attn},
  }
  if c.train.repa_weight > 0:
    head = repa_forward(dit_families.family(c.model.dit.kind).feature_width(dit_cfg), width, tokens)
    per_image["repa"] = {"forward": head, "backward": 2.0 * head}
  if not c.data.cached:
    # The pair recipe skips the ViT unless REPA needs its tokens; latents are still encoded.
    per_image["vit"] = {"forward": vit_forward(mcfg) if run.statics.needs_vit else 0.0, "backward": 0.0}
    if c.model.autoencoder.kind == "flux_vae":
      per_image["vae"] = {"forward": vae_encoder_forward(factory.vae_config(c), c.data.resolution), "backward": 0.0}
  remat = llm_dense + llm_attn if c.model.mllm.remat != "none" else 0.0
  b = c.train.global_batch
  model = b * sum(v["forward"] + v["backward"] for v in per_image.values())
  return {
      "per_image": per_image,
      "remat_per_image": {"llm": remat},
      "model": model,
      "remat": b * remat,
      "hardware": model + b * remat,
  }


def image_tokens(run) -> int:
  """The DiT's tokens per image: the latent grid over the DiT family's patch (2×2 for FLUX's MM-DiT, S3-DiT's
  `all_patch_size`); the tokens in `tokens_per_s_per_device` and in every count here."""
  patch = dit_families.family(run.config.model.dit.kind).patch(
      factory.dit_config(run.config, factory.mllm_width(run.mcfg))
  )
  return (run.latent_shape[0] // patch) * (run.latent_shape[1] // patch)


def flops_per_step(run) -> float:
  """Model FLOPs of one step (forward + backward, no recompute): the MFU numerator."""
  return step_flops(run)["model"]
