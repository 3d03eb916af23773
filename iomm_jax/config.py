"""The configuration schema: every field with its default and meaning, the path fields, and the recipe variants.

configs/*.py start from `base_config()` and override; `config_validation.validate(config)` runs at start and fails
naming the field.
Model architecture sub-dicts (`model.dit.arch`, `model.mllm.arch`, `model.rqa`) are passed to the module config
dataclasses, whose own field names are the reference implementations' (diffusers / transformers) names.
"""

from __future__ import annotations

import os

import ml_collections

from iomm_jax import data_kinds

LR_DECAYS = ("constant", "cosine")  # train.lr_decay (train/optimizers.lr_schedule)
LOSS_SPACES = ("velocity", "clean")  # train.loss_space (train/loss.flow_matching_loss)
T_SAMPLINGS = ("uniform", "logit_normal")  # train.t_sampling (train/loss.sample_t)
OPTIMIZERS = ("adamw", "muon")  # train.optimizer (train/optimizers.make_optimizer)
STAGES = ("pretrain", "finetune")  # train.stage (a label for the run; the data recipe is data.recipe)
ON_NONFINITE = ("stop", "skip")  # train.on_nonfinite (train/guard.py; train/step.py keeps the old state on skip)
RQA_KINDS = ("rqa", "metaquery", "none")  # model.rqa.kind (models/rqa.py)
# model.mllm.aux_prompt's default, the paper's instruction before the masked image; the tiny MLLM's pre-training
# teaches it too (mllm_pretrain/examples.py), so the two cannot drift apart.
AUX_PROMPT = "Generate an image that is identical to the reference image:"

C = ml_collections.ConfigDict

# Logical axis → mesh axis (or None = replicated). Parameters carry the logical names (models/layers.py);
# batches are sharded over ('data', 'fsdp'). FSDP shards the model width; tensor parallelism shards heads/MLP.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("layers", None),
)


# The schema is a table (field, default, aligned comment): the formatter leaves it as written.
# fmt: off
def base_config() -> ml_collections.ConfigDict:
  """All fields, with defaults for IOMM-B pre-training (docs/design.md §1)."""
  c = C()
  c.seed = 0                       # master seed: params init, per-step rng (fold_in(step)), data order

  c.model = C()
  c.model.dtype = "bfloat16"       # compute dtype of DiT/RQA matmuls; params and optimizer state stay fp32
  c.model.frozen_dtype = "bfloat16"  # storage dtype of the frozen MLLM (and VAE) weights
  c.model.attention = "auto"       # attention of every module (DiT, RQA, VAE, ViT, LLM), models/layers.ATTENTION_IMPLS:
                                   #   'auto' (XLA picks; cuDNN on GPU where it can), 'cudnn', 'xla' (explicit fp32
                                   #   reference), 'splash' (Pallas kernel, TPU)
  c.model.condition = "query"      # DiT condition: 'query' = LLM last hidden at the RQA query positions, 'all' = every position
  c.model.prediction = "v"         # DiT output: 'v' = velocity z − x (FLUX, the paper); 'x' = the clean latent, used as
                                   #   v = (x_t − x̂)/max(t, 0.05) (pixel space with large patches, where v cannot be predicted)
  c.model.dit = C()
  c.model.dit.kind = "mmdit"       # 'mmdit' (FLUX MM-DiT, IOMM-B/L) or 's3dit' (Z-Image single-stream, IOMM-XL)
  c.model.dit.arch = C()           # fields of MMDiTConfig / S3DiTConfig (diffusers config names); empty = full-size defaults
  c.model.rqa = C()
  c.model.rqa.num_queries = 256    # learned queries (paper: 256)
  c.model.rqa.num_heads = 12       # cross-attention heads (width / 128)
  c.model.rqa.mlp_ratio = 4.0      # MLP hidden = ratio × width (4× gives the paper's ≈29M)
  c.model.rqa.num_layers = 1       # query blocks (paper: one)
  c.model.rqa.kind = "rqa"         # models/rqa.RQA_KINDS: 'rqa' (the paper); ablations: 'metaquery' (the learned queries
                                   #   alone, no adapter), 'none' (no queries: the DiT reads every LLM output position,
                                   #   needs model.condition='all')
  c.model.mllm = C()
  c.model.mllm.path = ""           # local InternVL3-2B-hf directory (config.json + safetensors + tokenizer); '' = random init from arch
  c.model.mllm.arch = C()          # InternVLConfig overrides when path is '' (tiny config); ignored when path is set
  c.model.mllm.aux_prompt = AUX_PROMPT
  c.model.mllm.remat = "full"      # LLM remat policy: 'none', 'full', 'dots_saveable' (the LLM runs fwd+bwd every step)
  c.model.mllm.scan_layers = False  # LLM decoder layers as one lax.scan: compiles one layer instead of all (DiT: arch.scan_layers)
  c.model.autoencoder = C()
  c.model.autoencoder.kind = "flux_vae"  # 'flux_vae' or 'identity' (pixel space, tiny)
  c.model.autoencoder.path = ""    # diffusers AutoencoderKL folder (FLUX VAE); '' = random init (tests, dry runs)
  c.model.autoencoder.scale = 1.0  # identity only: latent = image × scale
  c.model.autoencoder.factor = 1   # identity only: space-to-depth factor (latent = factor² × 3 channels)

  c.init = C()                     # optional starting weights of the generator (DiT + RQA)
  c.init.workdir = ""              # a finished training workdir (e.g. stage 1): start from its latest checkpoint
  c.init.use_ema = True            # with init.workdir: its EMA weights (else its raw weights)
  c.init.transformer = ""          # Orbax dirs written by `python -m iomm_jax.convert to-jax` (DiT / RQA)
  c.init.rqa = ""

  c.train = C()
  c.train.stage = "pretrain"       # 'pretrain' or 'finetune' (documentation; the recipe is data.recipe)
  c.train.num_steps = 100_000      # total optimizer updates (unless train.epochs > 0)
  c.train.time_budget_s = 0.0      # > 0: this call trains for at most this many seconds of wall time, its last step
                                   #   saved as at num_steps; rerunning resumes (train/time_budget.py); 0 = no limit
  c.train.epochs = 0.0             # > 0: train this many passes over the dataset (for 'mix', the captioned set), converted
                                   #   to steps from its size and global_batch (train/schedule.py); 0 = use num_steps
  c.train.global_batch = 1024      # images per update, over all processes
  c.train.grad_accum = 1           # microbatches per update: activations for global_batch / grad_accum images at a time
  c.train.mask_ratio = 0.85        # r: probability that each ViT image token is zeroed (one Bernoulli per token)
  c.train.p_uncond = 0.1           # condition dropout for CFG: the sample's condition becomes the empty-prompt template
  c.train.t_sampling = "uniform"   # 'uniform' (paper), 'logit_normal'
  c.train.logit_mean = 0.0         # logit-normal location
  c.train.logit_std = 1.0          # logit-normal scale
  c.train.time_shift = 1.0         # resolution shift s: t ← s·t / (1 + (s−1)·t); 1 = none
  c.train.loss_space = "velocity"  # 'velocity' (paper): MSE of v; 'clean': MSE of the implied clean latent (= t²·velocity
                                   #   MSE), which stops nearly clean inputs dominating the gradient
  c.train.edge_weight = 0.0        # > 0: add this × the squared error of the target's neighbour differences (pixels for
                                   #   the identity autoencoder), weighted as loss_space: edges, where shapes differ, weigh
                                   #   more; same minimiser (train/loss.per_sample_loss; not in the paper); 0 = off
  c.train.repa_weight = 0.0        # > 0: add this × REPA, aligning the DiT's inner image tokens with the frozen MLLM's
                                   #   tokens of the clean image (models/repa.py; not in the paper); 0 = off
  c.train.optimizer = "adamw"      # 'adamw' or 'muon' (IOMM-XL: Muon on the hidden blocks' 2-D kernels, update RMS
                                   #   matched to AdamW's; AdamW with b1/b2 on embedders, read-out, biases, norms, queries)
  c.train.muon_momentum = 0.95     # Muon's (Nesterov) momentum; used only when optimizer = 'muon'
  c.train.lr = 1e-4
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0          # global-norm clip
  c.train.warmup_steps = 1000      # linear warm-up from 0, then train.lr_decay
  c.train.lr_decay = "constant"    # after warm-up: 'constant' (paper) or 'cosine' to lr × lr_final_fraction at the run's end
  c.train.lr_final_fraction = 0.0  # cosine only: the lr at the last step as a fraction of train.lr
  c.train.ema_decay = 0.999        # 0 disables EMA
  c.train.log_every = 50           # steps between metrics.jsonl / TensorBoard entries
  c.train.ckpt_every = 2000        # steps between checkpoints (the last step is always saved)
  c.train.keep_checkpoints = 3     # checkpoints kept on disk
  c.train.sample_every = 5000      # steps between training-time sample grids (0 = never): text prompts and
                                   #   reconstructions of held-out images (data.val_*), any data source
  c.train.eval_every = 1000        # steps between validation losses on the held-out set (0 = never; data.val_*)
  c.train.eval_timesteps = (0.125, 0.375, 0.625, 0.875)  # the fixed t of the validation loss (each held-out image
                                   #   at every one, with fixed noise and masks: comparable across runs and resumes)
  c.train.peak_flops = 989e12      # per-device peak for MFU (H100 bf16 dense)
  c.train.on_nonfinite = "stop"    # non-finite loss or grad norm: 'stop' (one line, exit non-zero, never saved) or
                                   #   'skip' (keep the old state for that step; counted as nonfinite_total in metrics)
  c.train.restore_fallback = True  # newest checkpoint unreadable or non-finite: move it to <workdir>/damaged_checkpoints
                                   #   and resume from the newest intact one (False: stop with one line)
  c.train.profile_steps = (0, 0)   # (first step, count): jax.profiler trace of those steps into <workdir>/profile; count 0 = off
  c.train.compile_cache_dir = ""   # persistent XLA compilation cache: '' = <workdir's parent>/xla_cache (shared by the
                                   #   runs beside it, so restarts skip compiling), 'off' = none, else a folder

  c.data = C()
  c.data.source = "arrayrecord"    # one of data_kinds.SOURCES: 'shapes', 'folder', 'arrayrecord', 'tfds', 'jsonl',
                                   #   'csv', 'parquet'
  c.data.path = ""                 # dataset location (shapes: '' renders on the fly)
  c.data.num_images = 10_000       # shapes only: dataset size
  c.data.image_num_images = 0      # shapes + 'mix' with data.image_source='shapes': the image set's size (0 = num_images);
                                   #   the first num_images of it are the captioned pair set
  c.data.resolution = 512          # training image size (short-side resize + centre crop)
  c.data.vit_size = 448            # ViT input size (one tile, ImageNet mean/std)
  c.data.buckets = ()              # aspect-ratio buckets ((height, width), ...), sides multiples of 16: each record
                                   #   goes to the nearest aspect ratio, each global batch is one bucket; () = square
                                   #   crops at data.resolution (sampling and grids stay square at data.resolution)
  c.data.recipe = "image"          # 'image' (image-only), 'pair' (text-image pairs), 'mix' (λ image-only)
  c.data.mix_lambda = 0.5          # mix: probability that a sample is image-only
  c.data.image_source = ""         # mix: '' = image-only samples are pair-set images, captions dropped; else the
                                   #   image set's own source kind (as data.source), walked in its own shuffled order
  c.data.image_path = ""           # mix: where that image set lives (as data.path)
  c.data.image_cache_path = ""     # mix + data.cached: feature cache of the image set (as data.cache_path)
  c.data.max_text_tokens = 128     # caption template length (tokens, after the chat template)
  c.data.skip_uncaptioned = False  # pair/mix: count and skip caption-less records instead of failing at start
  c.data.num_workers = 0           # Grain worker processes (0 = in the training process)
  c.data.prefetch_buffer = 2       # batches prefetched per worker
  c.data.seed = 0                  # data order (global shuffle) and mix draws
  c.data.cached = False            # read cached ViT tokens + latents (python -m iomm_jax.cache) instead of images
  c.data.cache_path = ""           # where the feature cache lives
  c.data.image_key = "image"       # tfds / table sources: the image field or column (a path, encoded bytes, or a
                                   #   {bytes, path} struct as HF datasets write to Parquet)
  c.data.caption_key = "caption"   # tfds / table sources: the caption field or column ('' = no captions)
  c.data.split = "train"           # tfds: the split to read
  c.data.shapes_seed = 0           # shapes: the procedural world's content (data.seed only orders it)
  c.data.num_threads = 2           # Grain reader threads per process (decode runs in these)
  c.data.val_fraction = 0.0        # hold out this fraction of data.path's records (a seeded choice, never trained on)
                                   #   for validation losses and grids
  c.data.val_path = ""             # or: a separate validation set of data.source's kind (with data.cached, its cache)
  c.data.val_num = 64              # held-out examples used (the first of the held-out set); shapes without val_* use
                                   #   another draw of the world
  c.data.max_image_pixels = data_kinds.MAX_IMAGE_PIXELS  # images with more pixels (width × height, from the
                                   #   header) are skipped and counted, never decoded (decompression bombs); 0 = none
  c.data.min_image_side = 0        # images whose short side (from the header) is smaller are skipped and counted,
                                   #   never decoded (icons, tracking pixels); 0 = keep all. prepare's --min_size
                                   #   filters shards the same way when they are written

  c.sample = C()
  c.sample.steps = 50              # Euler steps from t=1 to t=0
  c.sample.cfg_scale = 4.5         # w in v = v_u + w (v_c − v_u)
  c.sample.num = 8                 # images per training-time grid
  c.sample.prompts = ("a red circle above a blue square",)  # training-time text prompts (grids)
  c.sample.prompts_file = ""       # or: a JSONL prompts file (GenEval metadata, {"prompt": ...} per line) for the grids
  c.sample.use_ema = True          # sample with EMA weights when present

  c.mesh = C()
  c.mesh.data = -1                 # mesh axis sizes; one may be −1 (filled from the device count)
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = DEFAULT_RULES     # logical axis → mesh axis

  c.distributed = C()
  c.distributed.coordinator = ""   # host:port of process 0 ('' = single process, or automatic under SLURM)
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.local_device_ids = ""  # e.g. '0,1,2,3' ('' = all visible)
  c.distributed.init_timeout_s = 300   # give up joining the job after this long
  c.distributed.heartbeat_timeout_s = 100  # a dead peer is detected within about this long
  return c
# fmt: on


class ConfigError(ValueError):
  """A config field is missing, unknown or inconsistent; the message names it."""


def get_field(config, dotted: str):
  """The value of a dotted field ('train.lr') of `config`."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


# The fields that name a local file or folder. A run saves them absolute (train/loop.save_resolved_config), so that
# sample, the evaluators and a later stage's init.workdir find them from any working directory.
PATH_FIELDS = (
    "model.mllm.path",
    "model.autoencoder.path",
    "init.workdir",
    "init.transformer",
    "init.rqa",
    "train.compile_cache_dir",
    "data.path",
    "data.image_path",
    "data.cache_path",
    "data.image_cache_path",
    "data.val_path",
    "sample.prompts_file",
)


def _is_local(value: str) -> bool:
  return bool(value) and "://" not in value  # set, and not a URL such as gs://…


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose set PATH_FIELDS are absolute (`~` expanded; a URL kept)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for field in PATH_FIELDS:
    section, _, key = field.rpartition(".")
    node = get_field(out, section)
    if _is_local(node[key]):
      node[key] = os.path.abspath(os.path.expanduser(node[key]))
  return out


def relative_paths(config: ml_collections.ConfigDict) -> list[str]:
  """'field=value' for each set PATH_FIELD that is relative (read from the current directory)."""
  return [
      f"{field}={get_field(config, field)!r}"
      for field in PATH_FIELDS
      if _is_local(get_field(config, field)) and not os.path.isabs(os.path.expanduser(get_field(config, field)))
  ]


VARIANTS = {
    # arg: (stage, recipe) — the paper's six recipes are {pretrain, pair_pretrain} followed by one of the finetunes.
    "": ("pretrain", "image"),
    "pretrain": ("pretrain", "image"),
    "pair_pretrain": ("pretrain", "pair"),
    "finetune": ("finetune", "mix"),
    "finetune_mix": ("finetune", "mix"),
    "finetune_pair": ("finetune", "pair"),
    "finetune_image": ("finetune", "image"),
}


def variant_word(stage: str, recipe: str) -> str:
  """The config variant word of (stage, recipe), e.g. ('finetune', 'pair') → 'finetune_pair': parse_variant's inverse."""
  for word, stage_recipe in VARIANTS.items():
    if word and stage_recipe == (stage, recipe):
      return word
  raise ConfigError(f"no config variant trains recipe {recipe!r} in stage {stage!r}")


def parse_variant(arg: str | None, known_flags: frozenset[str] = frozenset()) -> tuple[str, str, set[str]]:
  """'finetune,1024' → ('finetune', 'mix', {'1024'}): the recipe word plus the config's own flags.

  A word that is neither a recipe nor one of `known_flags` (a typo such as 'finetnue') is a ConfigError naming both
  lists: silently ignored, it would have trained the default recipe."""
  words = [w for w in (arg or "").split(",") if w]
  recipe_words = [w for w in words if w in VARIANTS]
  if len(recipe_words) > 1:
    raise ConfigError(f"config variant {arg!r} names more than one recipe: {recipe_words}")
  unknown = sorted(set(words) - set(recipe_words) - set(known_flags))
  if unknown:
    raise ConfigError(
        f"unknown config variant word(s) {unknown} in {arg!r}; recipes: {sorted(k for k in VARIANTS if k)}; "
        f"flags: {sorted(known_flags) or 'none'}"
    )
  stage, recipe = VARIANTS[recipe_words[0] if recipe_words else ""]
  return stage, recipe, set(words) - set(recipe_words)
