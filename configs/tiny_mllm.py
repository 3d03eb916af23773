"""The tiny world's MLLM: an InternVL-structured model (InternViT → pixel shuffle → projector → Qwen2 + LM head)
trained by `python -m iomm_jax.pretrain_mllm --config=configs/tiny_mllm.py --out=DIR` on procedural shapes and their
captions, then frozen and loaded by configs/tiny.py through model.mllm.path, as InternVL3-2B is for the full sizes.

TINY_MLLM_ARCH is the one place the architecture lives; configs/tiny.py imports it. The MLLM sees what IOMM training
feeds it: shapes rendered at its ViT input size with ImageNet mean/std (IOMM renders at the larger of its two views).
Variants: ':short' for a few-step smoke run (tests).
"""

import ml_collections

# InternVLConfig fields: ViT 64² / patch 8 → 64 patches → pixel shuffle 0.5 → 16 image tokens at the LLM width.
TINY_MLLM_ARCH = dict(
    vision=dict(
        image_size=64, patch_size=8, hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=192
    ),
    text=dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        max_position_embeddings=512,
    ),
)


def get_config(arg: str | None = None):
  flags = {w for w in (arg or "").split(",") if w}
  unknown = flags - {"short"}
  if unknown:
    raise ValueError(f"configs/tiny_mllm.py: unknown variant flag(s) {sorted(unknown)}; known: short")
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init and the order of training examples
  c.arch = TINY_MLLM_ARCH  # InternVLConfig fields (vision / text); the vocabulary is the tiny tokenizer's
  c.data = ml_collections.ConfigDict()
  c.data.resolution = TINY_MLLM_ARCH["vision"]["image_size"]  # render size of the shapes images: the ViT input
  c.data.seed = 1  # shapes dataset seed: another world draw than IOMM's training images (seed 0)
  c.data.num_images = 4096  # training images (each captioned); held-out images come from data.eval_seed
  c.data.eval_seed = 2  # held-out images for the caption accuracy report
  c.data.eval_num = 256
  c.data.text_only_fraction = 0.15  # share of text-only turns (the user says a caption, the assistant repeats it)
  c.data.max_len = 64  # tokens per training sequence (template + 16 image tokens + caption)
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 600
  c.train.batch = 32
  c.train.lr = 3e-3  # AdamW peak lr, linear warm-up then cosine decay to 10%
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.01
  c.train.grad_clip = 1.0
  c.train.log_every = 100
  if "short" in flags:
    c.data.num_images = 512
    c.data.eval_num = 32
    c.train.num_steps = 60
    c.train.log_every = 20
  c.lock()
  return c
