"""Build the IOMM modules (trainable generator, frozen MLLM, autoencoder, processor) from the config."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import jax.numpy as jnp
from flax import nnx

from iomm_jax.config import ConfigError
from iomm_jax.models import config_json, dit_families, vae_keys
from iomm_jax.models.autoencoder import make_autoencoder
from iomm_jax.models.internvit import InternViTConfig
from iomm_jax.models.internvl import InternVL, InternVLConfig
from iomm_jax.models.iomm import Generator
from iomm_jax.models.layers import ATTENTION_IMPLS
from iomm_jax.models.processor import Processor, load_processor
from iomm_jax.models.qwen2 import Qwen2Config
from iomm_jax.models.rqa import RQAConfig
from iomm_jax.models.internvl_keys import read_config
from iomm_jax.models.flux_vae import FluxVAEConfig
from iomm_jax.models.internvl_keys import MLLMCheckpointError

# The dtypes the models compute and keep frozen weights in (model.dtype, model.frozen_dtype), by dtype_names' names.
DTYPES = {name: getattr(jnp, name) for name in ("float32", "bfloat16")}


def _known(cls, fields: dict, where: str) -> dict:
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - names)
  if unknown:
    raise ConfigError(f"{where} has unknown field(s) {unknown}; {cls.__name__} fields are {sorted(names)}")
  return fields


@contextlib.contextmanager
def _config_fields(where: str):
  """A module config's own check (a ValueError or TypeError from its dataclass) becomes a ConfigError naming the
  config section it was built from, so the apps report it in one line."""
  try:
    yield
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where}: {e}") from None


def mllm_config(config) -> InternVLConfig:
  """The InternVL config: from the checkpoint's config.json when model.mllm.path is set, else from model.mllm.arch.

  A random MLLM (no path) uses the built-in tiny tokenizer, so its image-token id, and its vocabulary size unless
  the arch names a larger one, are taken from that tokenizer.
  """
  if config.model.mllm.path:

    cfg = read_config(config.model.mllm.path)
  else:
    arch = {
        k: (v.to_dict() if hasattr(v, "to_dict") else dict(v)) if k in ("vision", "text") else v
        for k, v in dict(config.model.mllm.arch).items()
    }
    with _config_fields("config.model.mllm.arch"):
      vision = InternViTConfig(**_known(InternViTConfig, arch.pop("vision", {}), "config.model.mllm.arch.vision"))
      text = arch.pop("text", {})
      _known(Qwen2Config, text, "config.model.mllm.arch.text")
      cfg = InternVLConfig(vision=vision, **_known(InternVLConfig, arch, "config.model.mllm.arch"))
      tok = Processor.tiny(num_image_tokens=cfg.num_image_tokens, image_size=vision.image_size)
      # An arch that names a larger vocabulary keeps it (the full-size configs: InternVL3-2B's embedding, which the
      # dry run must count); rows past the tiny tokenizer's are never read.
      text = dict(text, vocab_size=max(int(text.get("vocab_size", 0)), tok.vocab_size))
      cfg = dataclasses.replace(cfg, text=Qwen2Config(**text), image_token_id=tok.image_token_id)
  return dataclasses.replace(
      cfg,
      remat=config.model.mllm.remat,
      scan_layers=bool(config.model.mllm.scan_layers),
      attention=config.model.attention,
  )


def mllm_width(cfg: InternVLConfig) -> int:
  return cfg.text.hidden_size


def dit_config(config, width: int):
  """MMDiTConfig / S3DiTConfig from model.dit.arch; the condition width must equal the MLLM width."""
  arch = dict(config.model.dit.arch)
  for name in ("attention", "attention_impl", "attn_implementation"):
    if name in arch:
      raise ConfigError(
          f"config.model.dit.arch.{name} is not a DiT field: attention is one setting for every module, "
          f"--config.model.attention (one of {ATTENTION_IMPLS})"
      )
  arch["attention"] = config.model.attention
  fam = dit_families.family(config.model.dit.kind)
  with _config_fields("config.model.dit.arch"):
    cfg = fam.config(**_known(fam.config, arch, "config.model.dit.arch"))
  for name in fam.condition_fields:
    if getattr(cfg, name) != width:
      raise ConfigError(f"config.model.dit.arch.{name}={getattr(cfg, name)} must equal the MLLM width {width}")
  return cfg


def rqa_config(config, width: int) -> RQAConfig:
  r = config.model.rqa
  if width % r.num_heads:
    raise ConfigError(f"config.model.rqa.num_heads={r.num_heads} does not divide the MLLM width {width}")
  with _config_fields("config.model.rqa"):
    return RQAConfig(
        dim=width,
        num_queries=r.num_queries,
        num_heads=r.num_heads,
        mlp_ratio=r.mlp_ratio,
        num_layers=r.num_layers,
        attention=config.model.attention,
        kind=r.kind,
    )


def make_generator(config, rngs: nnx.Rngs, mcfg: InternVLConfig | None = None) -> Generator:
  """The trainable DiT + RQA (fp32 params, compute in config.model.dtype)."""
  mcfg = mcfg or mllm_config(config)
  width = mllm_width(mcfg)
  return Generator(
      config.model.dit.kind,
      dit_config(config, width),
      rqa_config(config, width),
      prediction=config.model.prediction,
      repa_dim=width if config.train.repa_weight > 0 else 0,  # the head maps onto the MLLM's image tokens
      dtype=DTYPES[config.model.dtype],
      param_dtype=jnp.float32,
      rngs=rngs,
  )


def make_mllm(config, rngs: nnx.Rngs, mcfg: InternVLConfig | None = None) -> InternVL:
  """The frozen InternVL, randomly initialised (tiny / dry runs); real weights come from load_internvl."""
  mcfg = mcfg or mllm_config(config)
  dtype = DTYPES[config.model.frozen_dtype]
  return InternVL(mcfg, dtype=dtype, param_dtype=dtype, rngs=rngs)


def make_ae(config, rngs: nnx.Rngs):
  a = config.model.autoencoder
  if a.kind == "identity":
    return make_autoencoder("identity", scale=a.scale, channels=3, factor=a.factor)
  dtype = DTYPES[config.model.frozen_dtype]
  return make_autoencoder("flux_vae", cfg=vae_config(config), dtype=dtype, param_dtype=dtype, rngs=rngs)


def vae_config(config):
  """The FLUX VAE config: from the diffusers folder's config.json when model.autoencoder.path is set, else FLUX.1's."""

  path = config.model.autoencoder.path
  if not path:
    with _config_fields("config.model"):
      return FluxVAEConfig(attention=config.model.attention)
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise ConfigError(
        f"config.model.autoencoder.path={path!r} has no config.json; expected a diffusers AutoencoderKL "
        "folder (config.json + diffusion_pytorch_model.safetensors), e.g. the FLUX.1 'vae' subfolder"
    )
  with open(cfg_file) as f, _config_fields(cfg_file):
    raw = json.load(f)
  if not isinstance(raw, dict):
    raise ConfigError(f"{cfg_file} holds a JSON {type(raw).__name__}, not an object of config fields")
  try:  # the same checks as the converter's: a hand-edited field is one line, not a build error
    vae_keys.check_config_json(raw, cfg_file)
  except config_json.FieldTypeError as e:
    raise ConfigError(str(e)) from None
  with _config_fields(cfg_file):
    return dataclasses.replace(FluxVAEConfig.from_diffusers(raw), attention=config.model.attention)


def make_processor(config, mcfg: InternVLConfig | None = None) -> Processor:
  """Tokenizer + templates: from the MLLM directory, or the built-in tiny tokenizer for random MLLMs.

  A folder whose tokenizer, weights config and this run's data settings disagree fails here, naming the file and
  field (not deep inside the compiled step).
  """
  mcfg = mcfg or mllm_config(config)
  if config.model.mllm.path:

    processor = load_processor(config.model.mllm.path)
    check_mllm_fits(config, mcfg, processor)
    return processor
  return Processor.tiny(num_image_tokens=mcfg.num_image_tokens, image_size=mcfg.vision.image_size)


def tokenizer_mismatches(mcfg: InternVLConfig, processor: Processor, where: str) -> list[str]:
  """Where an MLLM folder's tokenizer and its config.json (`where`) disagree, one line each ([] when they agree):
  training stops on any, and `convert verify` fails on them."""
  out = []
  if processor.vocab_size > mcfg.text.vocab_size:
    out.append(
        f"{where}: text_config.vocab_size={mcfg.text.vocab_size} but the folder's tokenizer has "
        f"{processor.vocab_size} tokens; the weights were saved for another vocabulary (download the tokenizer and "
        "the weights from the same repository)"
    )
  if processor.image_token_id != mcfg.image_token_id:
    out.append(
        f"{where}: image_token_id={mcfg.image_token_id} but the tokenizer's <IMG_CONTEXT> is token "
        f"{processor.image_token_id}; the tokenizer and the weights come from different models"
    )
  return out


def check_mllm_fits(config, mcfg: InternVLConfig, processor: Processor) -> None:
  """The MLLM folder's tokenizer and config agree with each other and with this run's data settings."""

  where = f"{config.model.mllm.path}/config.json"
  mismatches = tokenizer_mismatches(mcfg, processor, where)
  if mismatches:
    raise MLLMCheckpointError(mismatches[0])
  if int(config.data.vit_size) != mcfg.vision.image_size:
    raise MLLMCheckpointError(
        f"{where}: vision_config.image_size={mcfg.vision.image_size} but config.data.vit_size="
        f"{config.data.vit_size}; set --config.data.vit_size={mcfg.vision.image_size} (the MLLM was trained at that "
        "size)"
    )
