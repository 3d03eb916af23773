"""Key table and config mapping for the MLLM (InternVL3 ↔ transformers.InternVLModel).

Our `InternVL` follows the transformers module tree exactly, so the default rule of `keymap` is the whole
mapping (Linear/Conv transposes, `embedding`↔`weight`). What remains here:

- `normalize_torch_key`: checkpoint files use the llava layout (`vision_tower.…`, `multi_modal_projector.…`,
  `language_model.model.…`, `language_model.lm_head.weight`: the published `-hf` checkpoints, and what
  transformers 5 `save_pretrained` writes), while the in-memory InternVLForConditionalGeneration state dict is
  `model.vision_tower.…`, `model.language_model.…`, `lm_head.weight`. Both map onto InternVLModel keys.
- `config_from_torch` / `config_to_torch`: transformers InternVLConfig dict ↔ our `InternVLConfig`. Missing
  fields take *transformers'* defaults (save_pretrained may omit defaults), not ours.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from iomm_jax.models import config_json
from iomm_jax.models.internvit import InternViTConfig
from iomm_jax.models.internvl import InternVLConfig
from iomm_jax.models.keymap import KeyTable
from iomm_jax.models.qwen2 import Qwen2Config

LM_HEAD = "lm_head.weight"


def key_table(with_lm_head: bool = False) -> KeyTable:
  """The MLLM KeyTable; without an lm_head in the model, a checkpoint's lm_head.weight is ignored."""
  return KeyTable(component="mllm", rules=[], ignore_torch=[] if with_lm_head else [re.escape(LM_HEAD)])


KEY_TABLE = key_table(with_lm_head=False)

# How a transformers InternVL config.json's fields are checked (models/config_json): its sections and the classes
# that type them; transformers writes image/patch sizes as [h, w], a missing num_key_value_heads as null (= the
# number of heads); the image token id may be 0, the ViT's layer-scale init (unused: the weights hold the scale)
# of any sign.
JSON_SECTIONS = (("", InternVLConfig), ("vision_config", InternViTConfig), ("text_config", Qwen2Config))
JSON_TYPES = {
    "image_size": int | tuple[int, ...],
    "patch_size": int | tuple[int, ...],
    "num_key_value_heads": int | None,
}
JSON_ZERO_OK = ("image_token_id", "layer_scale_init_value")

_LAYOUT_RENAMES = (
    (re.compile(r"^model\."), ""),  # InternVLForConditionalGeneration
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),  # llava-style -hf checkpoints
    (re.compile(r"^language_model\.model\."), "language_model."),
)


def normalize_torch_key(key: str) -> str:
  """Any InternVL checkpoint key → the transformers InternVLModel key (plus `lm_head.weight`)."""
  for pattern, repl in _LAYOUT_RENAMES:
    key = pattern.sub(repl, key, count=1)
  return key


def to_checkpoint_key(key: str) -> str:
  """An InternVLModel key (or lm_head.weight) → the key of the file layout save_pretrained writes."""
  if key == LM_HEAD:
    return "language_model.lm_head.weight"
  return re.sub(r"^language_model\.", "language_model.model.", key)


# transformers 5.24 defaults for the fields we read (used when config.json omits them).
_HF_VISION = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    attention_bias=False,
    use_qk_norm=False,
    intermediate_size=4096,
    hidden_act="gelu",
    norm_type="layer_norm",
    layer_norm_eps=1e-6,
    image_size=(448, 448),
    patch_size=(14, 14),
    num_channels=3,
    use_mask_token=False,
    use_absolute_position_embeddings=True,
    layer_scale_init_value=0.1,
    use_mean_pooling=True,
)
_HF_TEXT = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=22016,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    head_dim=None,
    use_sliding_window=False,
    rope_theta=10000.0,
)
_HF_TOP = dict(
    image_token_id=151667,
    downsample_ratio=0.5,
    projector_hidden_act="gelu",
    vision_feature_layer=-1,
    vision_feature_select_strategy="default",
)


def _square(name: str, value) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"config.json vision_config.{name}={value}: only square sizes are supported")
    return int(value[0])
  return int(value)


class UnsupportedMLLMConfig(ValueError):
  """An InternVL config.json using a feature this port does not implement (a non-Qwen2 LLM, scaled RoPE, ...)."""


_SUPPORTED = (
    "this port runs InternVL3 / InternVL2.5 -hf checkpoints (a Qwen2 LLM, plain RoPE, no sliding window), such as "
    "OpenGVLab/InternVL3-2B-hf"
)


def _rope_theta(text: Mapping[str, Any]) -> float:
  rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
  rtype = rope.get("rope_type", rope.get("type", "default"))
  if rtype != "default":
    raise UnsupportedMLLMConfig(f"text_config rope type {rtype!r} is not supported (only 'default' RoPE)")
  return float(rope.get("rope_theta", text.get("rope_theta", _HF_TEXT["rope_theta"])))


# What a folder that is not an InternVL -hf one usually is, by its model_type: said in the refusal.
_WHAT_FOLDER = {
    "internvl_chat": " (InternVL's trust_remote_code layout: use the '-hf' repository of the same model)",
    "qwen2": " (a Qwen2 language model alone: IOMM's frozen MLLM is the whole InternVL, vision encoder included)",
    "qwen3": " (a Qwen3 language model alone: IOMM's frozen MLLM is the whole InternVL, vision encoder included)",
    "intern_vit_6b": " (InternVL's vision encoder alone: IOMM's frozen MLLM is the whole InternVL)",
    "internvl_vision": " (InternVL's vision encoder alone: IOMM's frozen MLLM is the whole InternVL)",
    "clip": " (a CLIP model: IOMM's frozen MLLM is an InternVL)",
    "clip_vision_model": " (a CLIP vision encoder: IOMM's frozen MLLM is an InternVL)",
    "siglip": " (a SigLIP model: IOMM's frozen MLLM is an InternVL)",
    "siglip_vision_model": " (a SigLIP vision encoder: IOMM's frozen MLLM is an InternVL)",
}


def config_from_torch(config: Mapping[str, Any], **overrides):
  """A transformers InternVLConfig dict → `InternVLConfig` (`overrides` set top-level fields, e.g. remat)."""
  model_type = config.get("model_type", "internvl")
  if model_type != "internvl":
    raise ValueError(
        f"config.json model_type={model_type!r}{_WHAT_FOLDER.get(model_type, '')}; expected 'internvl' (a "
        "transformers '-hf' checkpoint such as OpenGVLab/InternVL3-2B-hf, not the trust_remote_code one)"
    )
  top = {**_HF_TOP, **{k: config[k] for k in _HF_TOP if k in config}}
  if top["vision_feature_layer"] != -1 or top["vision_feature_select_strategy"] != "default":
    raise UnsupportedMLLMConfig(
        "only vision_feature_layer=-1 with vision_feature_select_strategy='default' "
        f"is supported (got {top['vision_feature_layer']}, {top['vision_feature_select_strategy']!r})"
    )
  for section in ("vision_config", "text_config"):  # transformers' defaults would build a different, 4096-wide model
    if not isinstance(config.get(section), dict):
      raise ValueError(f"config.json has no {section} section")
  v = {**_HF_VISION, **{k: val for k, val in config["vision_config"].items() if k in _HF_VISION}}
  t_raw = config["text_config"]
  if t_raw.get("model_type", "qwen2") != "qwen2":
    raise UnsupportedMLLMConfig(
        f"text_config.model_type={t_raw.get('model_type')!r}: an InternVL with that LLM (InternVL3.5 uses Qwen3) is "
        "not supported"
    )
  if t_raw.get("use_sliding_window", False):
    raise UnsupportedMLLMConfig("text_config.use_sliding_window=true is not supported")
  t = {**_HF_TEXT, **{k: val for k, val in t_raw.items() if k in _HF_TEXT}}
  vision = InternViTConfig(
      image_size=_square("image_size", v["image_size"]),
      patch_size=_square("patch_size", v["patch_size"]),
      num_channels=v["num_channels"],
      hidden_size=v["hidden_size"],
      num_hidden_layers=v["num_hidden_layers"],
      num_attention_heads=v["num_attention_heads"],
      intermediate_size=v["intermediate_size"],
      norm_type=v["norm_type"],
      use_qk_norm=bool(v["use_qk_norm"]),
      layer_scale_init_value=float(v["layer_scale_init_value"]),
      layer_norm_eps=float(v["layer_norm_eps"]),
      attention_bias=bool(v["attention_bias"]),
      hidden_act=v["hidden_act"],
      use_mean_pooling=bool(v["use_mean_pooling"]),
      use_mask_token=bool(v["use_mask_token"]),
      use_absolute_position_embeddings=bool(v["use_absolute_position_embeddings"]),
  )
  text = Qwen2Config(
      vocab_size=t["vocab_size"],
      hidden_size=t["hidden_size"],
      intermediate_size=t["intermediate_size"],
      num_hidden_layers=t["num_hidden_layers"],
      num_attention_heads=t["num_attention_heads"],
      num_key_value_heads=t["num_key_value_heads"] or t["num_attention_heads"],
      head_dim=t["head_dim"],
      rope_theta=_rope_theta(t_raw),
      rms_norm_eps=float(t["rms_norm_eps"]),
      max_position_embeddings=t["max_position_embeddings"],
      hidden_act=t["hidden_act"],
  )
  return InternVLConfig(
      vision=vision,
      text=text,
      downsample_ratio=float(top["downsample_ratio"]),
      projector_hidden_act=top["projector_hidden_act"],
      image_token_id=int(top["image_token_id"]),
      **overrides,
  )


def config_to_torch(cfg) -> dict:
  """`InternVLConfig` → a transformers InternVLConfig dict (loadable with `InternVLConfig(**d)`)."""
  v, t = cfg.vision, cfg.text
  vision = {k: getattr(v, k) for k in _HF_VISION if k not in ("image_size", "patch_size")}
  vision.update(image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2, model_type="internvl_vision")
  text = dict(
      model_type="qwen2",
      vocab_size=t.vocab_size,
      hidden_size=t.hidden_size,
      intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_hidden_layers,
      num_attention_heads=t.num_attention_heads,
      num_key_value_heads=t.num_key_value_heads,
      hidden_act=t.hidden_act,
      max_position_embeddings=t.max_position_embeddings,
      rms_norm_eps=t.rms_norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
      tie_word_embeddings=False,
  )
  if t.head_dim is not None:
    text["head_dim"] = t.head_dim
  return dict(
      model_type="internvl",
      architectures=["InternVLForConditionalGeneration"],
      vision_config=vision,
      text_config=text,
      image_token_id=cfg.image_token_id,
      image_seq_length=cfg.num_image_tokens,
      downsample_ratio=cfg.downsample_ratio,
      projector_hidden_act=cfg.projector_hidden_act,
      vision_feature_layer=-1,
      vision_feature_select_strategy="default",
      tie_word_embeddings=False,
  )


EXPECTED_LAYOUT = (
    "expected a local copy of a transformers InternVL checkpoint such as OpenGVLab/InternVL3-2B-hf: a directory "
    "with config.json (model_type 'internvl'), model.safetensors or sharded *.safetensors with "
    "model.safetensors.index.json, and the tokenizer files (tokenizer.json, tokenizer_config.json, …). "
    "Download it e.g. with `huggingface-cli download OpenGVLab/InternVL3-2B-hf --local-dir DIR`."
)


class MLLMCheckpointError(FileNotFoundError):
  """The MLLM directory is missing or not in the expected layout."""


def read_config(path: str | Path, **overrides) -> "InternVLConfig":
  """InternVLConfig from DIR/config.json (`overrides`: top-level fields such as remat, with_lm_head)."""
  p = Path(path)
  if not p.is_dir():
    raise MLLMCheckpointError(f"MLLM path {p} is not a directory; {EXPECTED_LAYOUT}")
  cfg_file = p / "config.json"
  if not cfg_file.is_file():
    raise MLLMCheckpointError(f"MLLM path {p} has no config.json; {EXPECTED_LAYOUT}")
  try:
    raw = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise MLLMCheckpointError(f"{cfg_file} is not valid JSON ({e}); {EXPECTED_LAYOUT}") from e
  if not isinstance(raw, dict):
    raise MLLMCheckpointError(f"{cfg_file} holds a JSON {type(raw).__name__}, not an object; {EXPECTED_LAYOUT}")
  if raw.get("model_type", "internvl") == "internvl":  # another model's folder: config_from_torch names it
    try:
      config_json.check(JSON_SECTIONS, raw, cfg_file, types=JSON_TYPES, zero_ok=JSON_ZERO_OK)
    except config_json.FieldTypeError as e:
      raise MLLMCheckpointError(str(e)) from None
  try:
    return config_from_torch(raw, **overrides)
  except UnsupportedMLLMConfig as e:  # an InternVL, but not one this port runs: no download advice
    raise MLLMCheckpointError(f"{cfg_file}: {e}; {_SUPPORTED}") from None
  except (KeyError, TypeError, ValueError) as e:
    raise MLLMCheckpointError(f"{cfg_file} does not describe an InternVL model ({e}); {EXPECTED_LAYOUT}") from None
