"""Start-up validation of a config: each check fails with one line naming the field (`ConfigError`).

`validate(config)` runs before anything is built (main, cache, pretrain_mllm, the benches); `validate_data` checks the
data section alone (`data.data_config.from_config` runs it). The schema itself — every field and its default — is
`config.base_config()`.
"""

from __future__ import annotations

import difflib
import os

import jax
import ml_collections

from iomm_jax import config_cli, data_kinds
from iomm_jax.config import (
    LOSS_SPACES,
    LR_DECAYS,
    ON_NONFINITE,
    OPTIMIZERS,
    RQA_KINDS,
    STAGES,
    T_SAMPLINGS,
    ConfigError,
    base_config,
    get_field,
)
from iomm_jax.models.autoencoder import AUTOENCODERS
from iomm_jax.models.dit_families import DIT_FAMILIES
from iomm_jax.models.factory import DTYPES
from iomm_jax.models import internvl_keys
from iomm_jax.models.iomm import CONDITION_MODES, PREDICTIONS
from iomm_jax.models.layer_stack import REMAT_POLICIES
from iomm_jax.models.layers import ATTENTION_IMPLS
from iomm_jax.parallel import MESH_AXES
from iomm_jax import workdir_layout

# The fields whose value must be one of a fixed list: each list is imported from the code that acts on the value.
CHOICES = {
    "model.dtype": tuple(DTYPES),
    "model.frozen_dtype": tuple(DTYPES),
    "model.attention": ATTENTION_IMPLS,
    "model.condition": CONDITION_MODES,
    "model.prediction": PREDICTIONS,
    "model.dit.kind": tuple(DIT_FAMILIES),
    "model.rqa.kind": RQA_KINDS,
    "model.mllm.remat": tuple(REMAT_POLICIES),
    "model.autoencoder.kind": AUTOENCODERS,
    "train.stage": STAGES,
    "train.t_sampling": T_SAMPLINGS,
    "train.optimizer": OPTIMIZERS,
    "train.lr_decay": LR_DECAYS,
    "train.loss_space": LOSS_SPACES,
    "train.on_nonfinite": ON_NONFINITE,
    "data.source": data_kinds.SOURCES,
    "data.recipe": data_kinds.RECIPES,
}


def known_fields(node=None, prefix: str = "") -> list[str]:
  """Every dotted field of the schema (`base_config()`), e.g. 'train.lr'."""
  node = base_config() if node is None else node
  out = []
  for key, value in node.items():
    name = f"{prefix}{key}"
    out += known_fields(value, name + ".") if isinstance(value, ml_collections.ConfigDict) else [name]
  return out


def unknown_field_message(field: str, config: ml_collections.ConfigDict | None = None) -> str:
  """One line naming an unknown `field` ('train.nonexistent') and the nearest known fields: the schema's, and
  `config`'s when given (the config file as loaded, whose free-form sections such as `model.dit.arch` the schema
  leaves empty)."""
  known = known_fields()
  if config is not None:
    known += [k for k in known_fields(config) if k not in set(known)]
  section = field.rsplit(".", 1)[0] + "." if "." in field else ""
  near = difflib.get_close_matches(field, known, n=3, cutoff=0.6)
  if not near and section:  # nothing close: list the section's own fields
    near = [k for k in known if k.startswith(section)][:8]
  hint = f"; nearest known fields: {', '.join('config.' + n for n in near)}" if near else ""
  return f"unknown config field config.{field}{hint}"


CUDNN_DTYPES = tuple(d for d in DTYPES if d != "float32")  # cuDNN fused attention: the half-precision dtypes offered


def run_flags_parser(config_flag, flag_values=None):
  """The absl `flags_parser` of an IOMM run's `--config` (`python -m iomm_jax.main`, and the bench scripts that take
  the same flag): a missing file, a failing get_config, an unknown `--config.<field>` override (with the nearest
  known fields) or another command's config is one line, `config error: …`."""
  return config_cli.flags_parser(
      config_flag,
      unknown_field=unknown_field_message,
      sections=tuple(base_config().keys()),
      example="configs/tiny.py",
      flag_values=flag_values,
  )


def _validate_attention(m: ml_collections.ConfigDict) -> None:
  """'cudnn' runs only on an NVIDIA GPU and in half precision: refused at start, not as a traceback at the first
  step after the workdir is written."""
  if m.attention != "cudnn":
    return
  backend = jax.default_backend()
  if backend != "gpu":
    raise ConfigError(
        f"config.model.attention='cudnn' needs an NVIDIA GPU (this backend is {backend!r}); use 'auto', with which "
        "XLA takes cuDNN on a GPU where it can"
    )
  for field in ("dtype", "frozen_dtype"):
    if m[field] not in CUDNN_DTYPES:
      raise ConfigError(
          f"config.model.attention='cudnn' computes in {' or '.join(CUDNN_DTYPES)}, but config.model.{field}="
          f"{m[field]!r}; set it to 'bfloat16' or use attention 'auto'"
      )


def validate(config: ml_collections.ConfigDict, *, needs_data: bool = True) -> None:
  """Fail at start, naming the field, on any inconsistent or out-of-range setting.

  `needs_data=False` (the dry run: it compiles with abstract arrays) skips the checks that a dataset path is set."""
  for field, choices in CHOICES.items():
    value = get_field(config, field)
    if value not in choices:
      raise ConfigError(f"config.{field}={value!r} is not one of {choices}")
  _validate_attention(config.model)
  t = config.train
  if not 0.0 <= t.mask_ratio < 1.0:
    raise ConfigError(f"config.train.mask_ratio={t.mask_ratio} must be in [0, 1)")
  if not 0.0 <= t.p_uncond < 1.0:
    raise ConfigError(f"config.train.p_uncond={t.p_uncond} must be in [0, 1)")
  if not t.lr > 0:
    raise ConfigError(f"config.train.lr={t.lr} must be positive")
  for name in ("b1", "b2", "muon_momentum"):
    if not 0.0 <= t[name] < 1.0:
      raise ConfigError(f"config.train.{name}={t[name]} must be in [0, 1)")
  for name in ("eps", "time_shift", "logit_std"):  # a zero shift or spread puts every t at one point
    if not t[name] > 0:
      raise ConfigError(f"config.train.{name}={t[name]} must be positive")
  if not 0.0 <= t.ema_decay < 1.0:
    raise ConfigError(f"config.train.ema_decay={t.ema_decay} must be in [0, 1) (0 disables EMA)")
  for name in ("num_steps", "global_batch", "grad_accum", "log_every", "ckpt_every", "keep_checkpoints"):
    if t[name] <= 0:
      raise ConfigError(f"config.train.{name}={t[name]} must be positive")
  for name in (
      "warmup_steps",
      "sample_every",
      "eval_every",
      "time_budget_s",
      "edge_weight",
      "repa_weight",
      "weight_decay",
      "grad_clip",
      "epochs",
  ):
    if t[name] < 0:
      raise ConfigError(f"config.train.{name}={t[name]} must be >= 0")
  if not t.eval_timesteps or any(not 0.0 < float(x) <= 1.0 for x in t.eval_timesteps):
    raise ConfigError(f"config.train.eval_timesteps={t.eval_timesteps} must list one or more t in (0, 1]")
  if not t.peak_flops > 0:
    raise ConfigError(
        f"config.train.peak_flops={t.peak_flops} must be positive: one device's peak FLOP/s, which MFU divides by "
        "(989e12 for an H100's dense bf16)"
    )
  if not 0.0 <= t.lr_final_fraction <= 1.0:
    raise ConfigError(f"config.train.lr_final_fraction={t.lr_final_fraction} must be in [0, 1]")
  ps = tuple(t.profile_steps)
  if len(ps) != 2 or any(int(x) != x or x < 0 for x in ps):
    raise ConfigError(f"config.train.profile_steps={t.profile_steps} must be (first step, count), two integers >= 0")
  if config.data.resolution % data_kinds.DIVISOR and config.model.autoencoder.kind == "flux_vae":
    raise ConfigError(
        f"config.data.resolution={config.data.resolution} must be a multiple of {data_kinds.DIVISOR} "
        "(VAE 8× down, patch 2)"
    )
  validate_data(config.data, needs_data=needs_data)
  _validate_init(config)
  if config.model.mllm.path and not os.path.isdir(config.model.mllm.path):
    raise ConfigError(
        f"config.model.mllm.path={config.model.mllm.path!r} is not a directory; {internvl_keys.EXPECTED_LAYOUT}"
    )
  sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
  if sum(1 for s in sizes if s == -1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh sizes {sizes}: each must be positive, and at most one may be -1")
  logical = {name for name, _ in config.mesh.rules}
  for name in ("embed", "mlp", "heads", "kv", "vocab"):
    if name not in logical:
      raise ConfigError(f"config.mesh.rules has no entry for logical axis {name!r}")
  for name, axis in config.mesh.rules:
    if axis is not None and axis not in MESH_AXES:
      raise ConfigError(
          f"config.mesh.rules maps {name!r} to {axis!r}; mesh axes are {', '.join(map(repr, MESH_AXES))} or None"
      )
  if config.model.rqa.kind == "none" and config.model.condition != "all":
    raise ConfigError(
        "config.model.rqa.kind='none' adds no query tokens, so the DiT must read every LLM output position; set "
        "config.model.condition='all'"
    )
  if not config.model.rqa.mlp_ratio > 0:
    raise ConfigError(f"config.model.rqa.mlp_ratio={config.model.rqa.mlp_ratio} must be positive")
  if not config.sample.prompts:
    raise ConfigError("config.sample.prompts must list at least one prompt")
  for field in ("steps", "num"):
    if config.sample[field] < 1:
      raise ConfigError(f"config.sample.{field}={config.sample[field]} must be 1 or more")


def validate_data(d: ml_collections.ConfigDict, *, needs_data: bool = True) -> None:
  """The data section alone (`data.data_config.from_config` runs it too, so the data code never re-checks)."""
  for field, choices in CHOICES.items():
    if field.startswith("data.") and d[field[5:]] not in choices:
      raise ConfigError(f"config.{field}={d[field[5:]]!r} is not one of {choices}")
  if not 0.0 <= d.mix_lambda <= 1.0:
    raise ConfigError(f"config.data.mix_lambda={d.mix_lambda} must be in [0, 1]")
  for name in ("resolution", "vit_size", "max_text_tokens", "num_threads"):
    if d[name] <= 0:
      raise ConfigError(f"config.data.{name}={d[name]} must be positive")
  for name in (
      "num_workers",
      "prefetch_buffer",
      "max_image_pixels",
      "min_image_side",
      "num_images",
      "image_num_images",
  ):
    if d[name] < 0:
      raise ConfigError(f"config.data.{name}={d[name]} must be >= 0")
  if d.resolution % 2:
    raise ConfigError(f"config.data.resolution={d.resolution} must be even (2×2 patches)")
  if needs_data and d.cached and not d.cache_path:
    raise ConfigError("config.data.cached=True needs config.data.cache_path (write it with python -m iomm_jax.cache)")
  if needs_data and d.source != "shapes" and not d.cached and not d.path:
    raise ConfigError(f"config.data.path is empty but config.data.source={d.source!r} needs a dataset path")
  if not d.image_key:
    raise ConfigError(
        "config.data.image_key is empty; name the image field/column of the table or TFDS dataset " "(default 'image')"
    )
  if d.source == "shapes" and not d.cached and not d.num_images:
    raise ConfigError(
        "config.data.num_images=0 but config.data.source='shapes' renders that many images; set it "
        "to a positive number"
    )
  _validate_image_set(d)
  _validate_buckets(d)
  _validate_holdout(d)


def _validate_holdout(d: ml_collections.ConfigDict) -> None:
  """data.val_fraction / val_path / val_num: the held-out set of validation losses and grids."""
  if not 0.0 <= d.val_fraction <= 0.5:
    raise ConfigError(f"config.data.val_fraction={d.val_fraction} must be in [0, 0.5]")
  if d.val_fraction and d.val_path:
    raise ConfigError(
        f"config.data.val_fraction={d.val_fraction} and config.data.val_path={d.val_path!r} are both set; hold "
        "out a fraction of data.path or name a separate validation set, not both"
    )
  if d.val_num <= 0:
    raise ConfigError(f"config.data.val_num={d.val_num} must be positive")


IMAGE_SOURCES = ("",) + data_kinds.SOURCES  # data.image_source: '' = the pair set's own images


def _validate_image_set(d: ml_collections.ConfigDict) -> None:
  """data.image_source / image_path / image_cache_path: the separate image half of recipe 'mix'."""
  if d.image_source not in IMAGE_SOURCES:
    raise ConfigError(
        f"config.data.image_source={d.image_source!r} is not one of {IMAGE_SOURCES} ('' = the "
        "image-only samples of 'mix' are the pair set's images with their captions dropped)"
    )
  if not d.image_source:
    for name in ("image_path", "image_cache_path"):
      if d[name]:
        raise ConfigError(
            f"config.data.{name}={d[name]!r} is set but config.data.image_source is ''; set "
            f"config.data.image_source to the image set's kind (e.g. 'arrayrecord'), or clear it"
        )
    return
  if d.recipe != "mix":
    raise ConfigError(
        f"config.data.image_source={d.image_source!r} feeds the image-only half of recipe 'mix', but "
        f"config.data.recipe={d.recipe!r}; for image-only training set data.source/data.path instead"
    )
  if d.cached and not d.image_cache_path:
    raise ConfigError(
        "config.data.image_source is set and config.data.cached=True: config.data.image_cache_path "
        "must name the image set's feature cache (python -m iomm_jax.cache with data.source/data.path "
        "set to the image set)"
    )
  if not d.cached and d.image_source != "shapes" and not d.image_path:
    raise ConfigError(
        f"config.data.image_path is empty but config.data.image_source={d.image_source!r} needs the " "image set's path"
    )


def _validate_init(config: ml_collections.ConfigDict) -> None:
  """init.workdir (a training workdir whose state fits this run's) and init.transformer / init.rqa (converted
  weights) exclude each other; converted adapter weights are the paper's RQA (TorchRQA's), so only rqa.kind='rqa'
  takes them."""
  i = config.init
  if i.rqa and config.model.rqa.kind != "rqa":
    raise ConfigError(
        f"config.init.rqa={i.rqa!r} holds the paper's adapter (TorchRQA weights), but config.model.rqa.kind="
        f"{config.model.rqa.kind!r} builds {'no adapter' if config.model.rqa.kind == 'none' else 'another one'}; "
        "set config.model.rqa.kind='rqa' or leave config.init.rqa empty"
    )
  if not i.workdir:
    return
  if i.transformer or i.rqa:
    raise ConfigError(
        "config.init.workdir is set together with config.init.transformer/init.rqa; start either from a "
        "training workdir or from converted weights, not both"
    )
  if not workdir_layout.is_run(i.workdir):
    raise ConfigError(
        f"config.init.workdir={i.workdir!r} is not a training workdir (config.json + checkpoints/); "
        "point it at the workdir of a finished run (python -m iomm_jax.main --workdir=...)"
    )
  problem = init_workdir_problem(config)
  if problem:  # at start, before the workdir is written or the data and frozen weights load
    raise ConfigError(problem)


# What the generator's weights mean beyond their shapes (the DiT family, what its output and its condition are):
# fixed for a warm start (init.workdir) and for a resume (train/resume_check).
WEIGHTS_MEANING = ("model.dit.kind", "model.prediction", "model.condition")


def init_workdir_problem(config: ml_collections.ConfigDict) -> str:
  """Why config.init.workdir cannot start this run's generator, as its config.json says ('' when nothing there
  stands against it): a run's workdir whose weights mean what this run's do (WEIGHTS_MEANING, the adapter's kind).
  Only its weights are read, so its optimizer, EMA and REPA settings may differ from this run's. The warm start
  (`train/warm_start`) checks the same before reading the checkpoint, and then the weights' shapes."""
  workdir = config.init.workdir
  try:
    src = workdir_layout.read_config_json(workdir)
  except workdir_layout.SavedConfigError as e:
    return f"config.init.workdir={workdir!r}: {e}"
  if not isinstance(src, dict):
    return f"config.init.workdir={workdir!r}: its config.json is not a run's config (a JSON object)"
  for field in WEIGHTS_MEANING + ("model.rqa.kind",):
    theirs, ours = _saved_and_run(src, config, field)
    if theirs is not None and theirs != ours:  # None: a config.json from before the field existed
      return (
          f"config.init.workdir={workdir!r} was trained with {field}={theirs!r} but this run has "
          f"{field}={ours!r}; set config.{field}={theirs!r} or start from another workdir"
      )
  return ""


def _saved_and_run(src: dict, config, dotted: str):
  """(the saved config's value, this run's value) of a dotted field."""
  node_src, node_run = src, config
  for part in dotted.split("."):
    node_src, node_run = node_src.get(part, {}) if isinstance(node_src, dict) else None, node_run[part]
  return node_src, node_run


def _validate_buckets(d: ml_collections.ConfigDict) -> None:
  """data.buckets: well-formed shapes; not with the feature cache or a separate image set."""
  if not d.buckets:
    return
  try:
    data_kinds.check_buckets(d.buckets, field="config.data.buckets")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if d.cached:
    raise ConfigError(
        "config.data.buckets is not supported with config.data.cached=True (the feature cache holds "
        "one square crop per image); set config.data.buckets=() or train from images"
    )
  if d.image_source:
    raise ConfigError("config.data.buckets with config.data.image_source is not supported; use one of them")
