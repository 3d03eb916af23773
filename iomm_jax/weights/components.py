"""The converter's registry: for each component, our model/config classes, its key table, the config mappings
and the PyTorch reference it interchanges with.

Kinds (a `--component` names one of the first column; `transformer` resolves to mmdit or s3dit):

  component    kind    ours                         PyTorch reference (checkpoint layout)
  transformer  mmdit   models.mmdit.MMDiT           diffusers.FluxTransformer2DModel
  transformer  s3dit   models.s3dit.S3DiT           diffusers.ZImageTransformer2DModel
  vae          vae     models.flux_vae.FluxVAE      diffusers.AutoencoderKL
  rqa          rqa     models.rqa.RQA               convert.torch_rqa.TorchRQA (config.json + model.safetensors)
  mllm         mllm    models.internvl.InternVL     transformers.InternVLForConditionalGeneration (-hf layout)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from iomm_jax import tree_paths
from iomm_jax.models import config_json, internvl_keys, keymap, mmdit_keys, rqa_keys, s3dit_keys, vae_keys
from iomm_jax.models.mmdit import MMDiT
from iomm_jax.models.s3dit import S3DiT
from iomm_jax.models.flux_vae import FluxVAE
from iomm_jax.models.rqa import RQA
from iomm_jax.models.internvl import InternVL
from iomm_jax.models.flux_vae import FluxVAEConfig
from iomm_jax.models.internvl import InternVLConfig
from iomm_jax.models.mmdit import MMDiTConfig
from iomm_jax.models.rqa import RQAConfig
from iomm_jax.models.s3dit import S3DiTConfig

COMPONENTS = ("transformer", "vae", "rqa", "mllm")


class ConvertError(ValueError):
  """A user-facing conversion problem (bad path, wrong component, config mismatch); the message says the fix."""


def _same_key(key: str) -> str:
  return key


@dataclasses.dataclass(frozen=True)
class Spec:
  """How one kind of component converts. Callables take/return our frozen config dataclass."""

  kind: str  # 'mmdit' | 's3dit' | 'vae' | 'rqa' | 'mllm'
  component: str  # CLI name: 'transformer' | 'vae' | 'rqa' | 'mllm'
  torch_class: str  # `_class_name` (diffusers) / architectures[0] (transformers) / ours
  weights_prefix: str  # safetensors file stem written by to-torch
  config_from_torch: Callable[[Mapping[str, Any]], Any]
  config_to_torch: Callable[[Any], dict]
  build: Callable[..., nnx.Module]  # build(cfg, dtype=, param_dtype=, rngs=)
  config_cls: type
  table: Callable[[Any], keymap.KeyTable]  # the key table for a config (reads the module attribute each call)
  # Our config fields that do not describe the weights (not compared when checking a checkpoint against a run).
  runtime_fields: tuple[str, ...] = ()
  # File-layout key renames (InternVL files use the llava layout); identity for the others.
  from_file_key: Callable[[str], str] = _same_key
  to_file_key: Callable[[str], str] = _same_key
  torch_module: str = "diffusers"  # where `torch_class` is imported from (by the verifier; torch only there)
  # How the PyTorch config.json is checked before it is mapped (check_torch_config; the rules: models/config_json):
  # its sections, the fields typed otherwise there than in ours, and the fields that may be 0 (or of any sign).
  torch_sections: tuple[tuple[str, type], ...] = ()  # () = (('', config_cls),)
  torch_types: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  zero_ok: tuple[str, ...] = ()

  def abstract_model(self, cfg, *, param_dtype=jnp.float32, dtype=None) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves (no memory, no random init)."""
    return nnx.eval_shape(
        lambda: self.build(cfg, dtype=dtype or param_dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )

  def expected_shapes(self, cfg) -> dict[str, tuple[int, ...]]:
    """{our dotted path: shape} for every parameter."""
    state = nnx.state(self.abstract_model(cfg), nnx.Param)
    return {k: tuple(v.shape) for k, v in keymap.flatten_state(state).items()}

  def config_to_json(self, cfg) -> dict:
    return _jsonable(dataclasses.asdict(cfg))

  def config_from_json(self, d: Mapping[str, Any]):
    return _from_json(self.config_cls, d)

  def torch_config(self, cfg) -> dict:
    """The config.json written next to the safetensors (with `_class_name` / `architectures`)."""
    out = dict(self.config_to_torch(cfg))
    if self.kind == "mllm":
      out.setdefault("architectures", [self.torch_class])
    else:
      out = {"_class_name": self.torch_class, **out}
    return out

  def config_diff(self, a, b) -> list[tuple[str, Any, Any]]:
    """[(field, a's value, b's value)] over the fields that describe the weights (nested with dots)."""
    fb = tree_paths.flatten(self.config_to_json(b))
    out = []
    for path, va in tree_paths.flatten(self.config_to_json(a)).items():
      if path.split(".")[-1] in self.runtime_fields:
        continue
      vb = fb.get(path)
      if va != vb:
        out.append((path, va, vb))
    return out


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def _from_json(cls, d: Mapping[str, Any]):
  """A (possibly nested) frozen config dataclass from its JSON dict; lists become tuples."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ConvertError(
        f"component.json config has fields {unknown} that {cls.__name__} does not know; "
        "the checkpoint was written by a different iomm_jax version"
    )
  kw = {}
  for k, v in d.items():
    default = fields[k].default_factory() if fields[k].default_factory is not dataclasses.MISSING else None
    if isinstance(v, dict) and dataclasses.is_dataclass(default):
      kw[k] = _from_json(type(default), v)
    elif isinstance(v, list):
      kw[k] = tuple(v)
    else:
      kw[k] = v
  return cls(**kw)


def _build_mmdit(cfg, **kw):
  return MMDiT(cfg, **kw)


def _build_s3dit(cfg, **kw):
  return S3DiT(cfg, **kw)


def _build_vae(cfg, **kw):
  return FluxVAE(cfg, **kw)


def _build_rqa(cfg, **kw):
  return RQA(cfg, **kw)


def _build_mllm(cfg, **kw):
  return InternVL(cfg, **kw)


def _specs() -> dict[str, Spec]:
  return {
      "mmdit": Spec(
          "mmdit",
          "transformer",
          "FluxTransformer2DModel",
          "diffusion_pytorch_model",
          mmdit_keys.config_from_torch,
          mmdit_keys.config_to_torch,
          _build_mmdit,
          MMDiTConfig,
          lambda cfg: mmdit_keys.KEY_TABLE,
          MMDiTConfig.RUNTIME_FIELDS,
          zero_ok=("num_layers", "num_single_layers"),
      ),
      "s3dit": Spec(
          "s3dit",
          "transformer",
          "ZImageTransformer2DModel",
          "diffusion_pytorch_model",
          s3dit_keys.config_from_torch,
          s3dit_keys.config_to_torch,
          _build_s3dit,
          S3DiTConfig,
          lambda cfg: s3dit_keys.KEY_TABLE,
          S3DiTConfig.RUNTIME_FIELDS,
          zero_ok=("n_layers", "n_refiner_layers"),
      ),
      "vae": Spec(
          "vae",
          "vae",
          vae_keys.TORCH_CLASS,
          "diffusion_pytorch_model",
          vae_keys.config_from_diffusers,
          vae_keys.config_to_diffusers,
          _build_vae,
          FluxVAEConfig,
          lambda cfg: vae_keys.KEY_TABLE,
          ("attention",),
          torch_types=vae_keys.JSON_TYPES,
          zero_ok=vae_keys.JSON_ZERO_OK,
      ),
      "rqa": Spec(
          "rqa",
          "rqa",
          "TorchRQA",
          "model",
          _rqa_config_from_torch,
          rqa_keys.config_to_torch,
          _build_rqa,
          RQAConfig,
          lambda cfg: rqa_keys.KEY_TABLE,
          ("attention",),
          torch_module="iomm_jax.convert.torch_rqa",
      ),
      "mllm": Spec(
          "mllm",
          "mllm",
          "InternVLForConditionalGeneration",
          "model",
          internvl_keys.config_from_torch,
          internvl_keys.config_to_torch,
          _build_mllm,
          InternVLConfig,
          lambda cfg: internvl_keys.key_table(cfg.with_lm_head),
          ("remat", "scan_layers", "attention"),
          internvl_keys.normalize_torch_key,
          internvl_keys.to_checkpoint_key,
          torch_module="transformers",
          torch_sections=internvl_keys.JSON_SECTIONS,
          torch_types=internvl_keys.JSON_TYPES,
          zero_ok=internvl_keys.JSON_ZERO_OK,
      ),
  }


def _rqa_config_from_torch(config: Mapping[str, Any]):
  return rqa_keys.config_from_torch({k: v for k, v in config.items() if not k.startswith("_")})


_SPECS: dict[str, Spec] | None = None


def spec(kind: str) -> Spec:
  """The Spec of a kind ('mmdit', 's3dit', 'vae', 'rqa', 'mllm')."""
  global _SPECS
  if _SPECS is None:
    _SPECS = _specs()
  if kind not in _SPECS:
    raise ConvertError(f"unknown component kind {kind!r}; expected one of {sorted(_SPECS)}")
  return _SPECS[kind]


def kinds() -> tuple[str, ...]:
  """Every component kind the registry knows."""
  spec("mmdit")  # builds the table once
  return tuple(_SPECS)


def check_torch_config(spec: Spec, config: Mapping[str, Any], where) -> None:
  """Before a PyTorch config (the dict read from `where`, its config.json) is mapped and built: every architecture
  field it sets fits our config classes (models/config_json: integers, sizes of at least 1, finite positive numbers,
  lists where lists go), else one ConvertError naming the file and the field. Fields ours does not know are left to
  `config_from_torch`, which names them, and so is a config whose `_class_name` is another model's (a wrong
  --component: its fields mean something else)."""
  try:
    config_json.check(
        spec.torch_sections or (("", spec.config_cls),),
        config,
        where,
        types=spec.torch_types,
        zero_ok=spec.zero_ok,
        torch_class=spec.torch_class,
    )
  except config_json.FieldTypeError as e:
    raise ConvertError(str(e)) from None


_MMDIT_MARKERS = ("x_embedder.weight", "context_embedder.weight", "time_text_embed.")
_S3DIT_MARKERS = ("cap_embedder.", "all_x_embedder.", "x_pad_token")


def transformer_kind(config: Mapping[str, Any] | None, keys=()) -> str:
  """'mmdit' or 's3dit' from a diffusers config's `_class_name`, else from the checkpoint keys."""
  name = (config or {}).get("_class_name")
  by_class = {spec(k).torch_class: k for k in kinds() if spec(k).component == "transformer"}
  if isinstance(name, str) and name in by_class:
    return by_class[name]
  if name:
    raise ConvertError(
        f"config _class_name={name!r} is not a supported transformer; expected one of {sorted(by_class)}"
    )
  keys = list(keys)
  if any(k.startswith(m) for k in keys for m in _S3DIT_MARKERS):
    return "s3dit"
  if any(k.startswith(m) for k in keys for m in _MMDIT_MARKERS):
    return "mmdit"
  raise ConvertError(
      "cannot tell whether the transformer is an MM-DiT (FLUX) or an S3-DiT (Z-Image): the config "
      'has no _class_name and the keys match neither; add "_class_name" to the config JSON'
  )


def resolve_kind(component: str, config: Mapping[str, Any] | None, keys=()) -> str:
  """The kind for a CLI --component (transformer → detected)."""
  if component not in COMPONENTS:
    raise ConvertError(f"--component={component!r}; expected one of {COMPONENTS}")
  if component == "transformer":
    return transformer_kind(config, keys)
  return component
