"""Tiny IOMM on procedural shapes: pixel space (identity autoencoder), a ≈1M-parameter MM-DiT, a random frozen
InternVL-structured MLLM. Runs on 2 CPU cores in minutes (`make demo`).

Variants: configs/tiny.py:ARG with ARG in {pretrain (default), pair_pretrain, finetune (mix), finetune_pair,
finetune_image}; add ',short' for a few-step smoke run.
"""
from iomm_jax import config as schema


def get_config(arg: str | None = None):
  stage, recipe, flags = schema.parse_variant(arg)
  c = schema.base_config()
  c.seed = 0
  c.model.dtype = "float32"
  c.model.frozen_dtype = "float32"
  c.model.dit.kind = "mmdit"
  # diffusers FluxTransformer2DModel field names; in_channels = 12 latent channels × 2×2 patch.
  c.model.dit.arch = dict(in_channels=48, num_layers=2, num_single_layers=2, attention_head_dim=16,
                          num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
                          axes_dims_rope=(4, 6, 6), remat="none",
                          scan_layers=False)
  c.model.rqa.num_queries = 16
  c.model.rqa.num_heads = 4
  c.model.rqa.num_layers = 1
  c.model.mllm.path = ""
  c.model.mllm.remat = "none"
  # InternVLConfig fields (random init): ViT 56² / patch 7 → 64 patches → pixel shuffle 0.5 → 16 image tokens.
  c.model.mllm.arch = dict(
      vision=dict(image_size=56, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64),
      text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=512))
  c.model.autoencoder.kind = "identity"
  c.model.autoencoder.scale = 1.0
  c.model.autoencoder.factor = 2   # 32² RGB → 16²×12 latent → 64 DiT tokens (2×2 patches of 48 values)

  c.train.stage = stage
  c.train.num_steps = 1200
  c.train.global_batch = 32
  c.train.mask_ratio = 0.85
  c.train.lr = 1e-3              # small model: a larger step than the paper's 1e-4
  c.train.warmup_steps = 100
  c.train.ema_decay = 0.99
  c.train.log_every = 25
  c.train.ckpt_every = 400
  c.train.keep_checkpoints = 2
  c.train.sample_every = 400
  c.train.peak_flops = 1e11      # nominal CPU peak; MFU on CPU is only indicative

  c.data.source = "shapes"
  c.data.path = ""
  c.data.num_images = 4096
  c.data.resolution = 32
  c.data.vit_size = 56
  c.data.recipe = recipe
  c.data.max_text_tokens = 32
  c.data.num_workers = 0

  c.sample.steps = 25
  c.sample.cfg_scale = 4.5
  c.sample.num = 8
  c.sample.prompts = ("a red circle", "a blue square above a green triangle")

  c.mesh.data = -1
  if "short" in flags:
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.ckpt_every = 10
    c.train.sample_every = 0
    c.train.warmup_steps = 5
    c.sample.steps = 4
  return c
