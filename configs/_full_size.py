"""Shared settings of the paper-size configs (IOMM-B/L/XL): 512² images, FLUX VAE, InternVL3-2B, AdamW (0.9, 0.95)."""

from iomm_jax import config as schema

# Paper Table 5: fine-tuning global batch by resolution.
FINETUNE_BATCH = {512: 256, 1024: 96}


def full_size_config(arg, *, pretrain_batch, ema_decay, mask_ratio):
  """Base for iomm_b/l/xl. arg: recipe word (pretrain | pair_pretrain | finetune | finetune_pair | finetune_image)
  plus optional flags: '1024' (fine-tune at 1024²), 'cached' (read the offline feature cache)."""
  stage, recipe, flags = schema.parse_variant(arg, known_flags=frozenset({"1024", "cached"}))
  c = schema.base_config()
  c.model.autoencoder.kind = "flux_vae"
  c.model.mllm.path = ""  # set --config.model.mllm.path=/path/to/InternVL3-2B-hf for real training
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
  if stage == "finetune":
    c.train.global_batch = FINETUNE_BATCH[c.data.resolution]
    c.train.epochs = 10.0  # the paper: 10 epochs of the fine-tuning set, whatever the batch (256 at 512², 96 at 1024²)
    c.train.warmup_steps = 200
  else:
    c.train.global_batch = pretrain_batch
    c.train.num_steps = 110_000  # ≈10 epochs of 11M images at batch 1024
  return c
