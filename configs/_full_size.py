"""Shared settings of the paper-size configs (IOMM-B/L/XL): 512² images, FLUX VAE, InternVL3-2B, AdamW (0.9, 0.95)."""

from iomm_jax import config as schema
from iomm_jax.models.qwen2 import INTERNVL3_2B_LLM_WIDTH

# Paper Table 5: fine-tuning global batch by resolution.
FINETUNE_BATCH = {512: 256, 1024: 96}


def flux_mmdit(num_attention_heads: int) -> dict:
  """IOMM-B/L's DiT (`model.dit.arch`, diffusers FluxTransformer2DModel fields): 10 double + 20 single blocks of
  heads × 128, reading FLUX VAE latents (16 channels, 2×2 packed) and InternVL3-2B's hidden states."""
  return dict(
      in_channels=64,
      num_layers=10,
      num_single_layers=20,
      attention_head_dim=128,
      num_attention_heads=num_attention_heads,
      joint_attention_dim=INTERNVL3_2B_LLM_WIDTH,
      pooled_projection_dim=INTERNVL3_2B_LLM_WIDTH,
      axes_dims_rope=(16, 56, 56),
      remat="full",
      scan_layers=True,
  )


def full_size_config(arg, *, pretrain_batch, ema_decay, mask_ratio):
  """Base for iomm_b/l/xl. arg: recipe word (pretrain | pair_pretrain | finetune | finetune_pair | finetune_image)
  plus optional flags: '1024' (fine-tune at 1024²), 'cached' (read the offline feature cache)."""
  stage, recipe, flags = schema.parse_variant(arg, known_flags=frozenset({"1024", "cached"}))
  c = schema.base_config()
  c.model.autoencoder.kind = "flux_vae"
  c.model.mllm.path = ""  # set --config.model.mllm.path=/path/to/InternVL3-2B-hf for real training
  # Without a path: InternVL3-2B's architecture (InternVLConfig's defaults) with its whole vocabulary, so the dry
  # run counts the LLM's 151674 × 1536 embedding (233M parameters) as the real model has it.
  c.model.mllm.arch = dict(text=dict(vocab_size=151674))
  # Scan the LLM layers and (in each config) the DiT blocks: on the dry run this cut per-device peak memory 3–4×
  # and compile time 2–6× against unrolled blocks (launch/README.md).
  c.model.mllm.scan_layers = True
  c.train.stage = stage
  c.train.mask_ratio = mask_ratio
  c.train.ema_decay = ema_decay
  c.train.lr = 1e-4
  c.train.b1, c.train.b2 = 0.9, 0.95
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.data.recipe = recipe
  c.data.source = "arrayrecord"
  c.data.resolution = 1024 if "1024" in flags else 512
  c.data.vit_size = 448
  if "1024" in flags and stage != "finetune":
    raise schema.ConfigError("the paper has no 1024² pre-training; use '1024' with a finetune variant")
  c.data.cached = "cached" in flags
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every device
  if stage == "finetune":
    c.train.global_batch = FINETUNE_BATCH[c.data.resolution]
    c.train.epochs = 10.0  # the paper: 10 epochs of the fine-tuning set, whatever the batch (256 at 512², 96 at 1024²)
    c.train.warmup_steps = 200
  else:
    c.train.global_batch = pretrain_batch
    c.train.num_steps = 110_000  # ≈10 epochs of 11M images at batch 1024
  return c
