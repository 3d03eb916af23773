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
  c.data.text_only_fraction = 0.15  # share of text-only turns (the user says a caption, the assistant says it plainly)
  c.data.max_len = 64  # tokens per training sequence (template + 16 image tokens + caption)
  # Phase 1: the ViT alone, as a classifier of the object's shape on single-object scenes of data.seed's draw (a head
  # on its mean patch token, discarded after); captioning alone does not teach this ViT shape (mllm_pretrain/
  # vision_pretrain.py says what was measured). 0 steps: captioning from a random ViT.
  c.vision_pretrain = ml_collections.ConfigDict()
  c.vision_pretrain.num_steps = 1000
  c.vision_pretrain.num_images = 1400  # single-object scenes (about a third of the draw's scenes have one object)
  c.vision_pretrain.eval_num = 300  # held-out single-object scenes of data.eval_seed's draw, for its report
  c.vision_pretrain.batch = 32
  c.vision_pretrain.lr = 3e-3
  c.vision_pretrain.warmup_steps = 50
  c.vision_pretrain.weight_decay = 0.01
  c.vision_pretrain.grad_clip = 1.0
  # Phase 2: the whole MLLM on captioning and text-only turns.
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1800
  c.train.batch = 32
  c.train.lr = 3e-3  # AdamW peak lr, linear warm-up then cosine decay to 10%
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.01
  c.train.grad_clip = 1.0
  c.train.log_every = 100
  # Seconds after its first step at which the captioning phase ends at the step it is on, then is evaluated and saved
  # as usual (report: stopped_by); the ViT phase is not on this clock. 0 = no budget. make demo sets it.
  c.train.time_budget_s = 0.0
  if "short" in flags:
    c.data.num_images = 512
    c.data.eval_num = 32
    c.train.num_steps = 60
    c.vision_pretrain.num_steps = 60
    c.vision_pretrain.num_images = 256
    c.vision_pretrain.eval_num = 64
    c.train.log_every = 20
  c.lock()
  return c
