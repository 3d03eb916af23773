"""A training workdir's latest checkpoint → a PyTorch pipeline folder (or one trained component's folder).

OUT/transformer/        diffusers FluxTransformer2DModel / ZImageTransformer2DModel (config.json + safetensors)
OUT/rqa/                the RQA reference layout (convert/torch_rqa.py TorchRQA: config.json + model.safetensors)
OUT/vae/                diffusers AutoencoderKL, only when the run uses the FLUX VAE; otherwise
OUT/vae_NOTE.txt        says why there is none (the tiny config's identity autoencoder has no weights)
OUT/iomm_pipeline.json  the MLLM (path, or 'random tiny' with its config and seed), the aux prompt, mask ratio,
                        condition mode, sampling steps and CFG scale, resolution, autoencoder, conventions

`component_from_workdir` reads one trained component instead (`to-torch --component transformer|rqa --src WORKDIR`):
the DiT of any run, x-predicting ones included (a plain diffusers transformer folder), or the RQA. The MLLM and the
autoencoder are frozen and not in the checkpoints: asking for them is one line naming where the run reads them from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from iomm_jax.weights import components, transfer
from iomm_jax.models import internvl_keys, keymap
from iomm_jax.weights.components import ConvertError
from iomm_jax.models.flux_vae import FluxVAEConfig
from iomm_jax.train import builder, restore
from iomm_jax.models import factory
from iomm_jax import output_folder, workdir_layout, write_failures

PIPELINE_FILE = "iomm_pipeline.json"


def is_workdir(path: str | Path) -> bool:
  return workdir_layout.is_run(path)


def _flat(tree) -> dict[str, Any]:
  return {k: jax.device_get(v) for k, v in keymap.flatten_state(tree).items()}


def _vae_config(config):
  path = config.model.autoencoder.path
  if path:
    raw = transfer.read_torch_config(path)
    if raw is None:
      raise ConvertError(f"config.model.autoencoder.path={path} has no config.json; cannot describe the VAE")
    spec = components.spec("vae")
    components.check_torch_config(spec, raw, transfer.torch_config_file(path))
    try:
      return spec.config_from_torch(raw)
    except (TypeError, ValueError) as e:
      raise ConvertError(
          f"config.model.autoencoder.path={path}: its config.json does not describe a VAE ({e})"
      ) from None
  return FluxVAEConfig()


_CONDITION_POSITIONS = {  # config.model.condition → where the DiT's condition is read (models/iomm CONDITION_MODES)
    "query": "the RQA query positions",
    "all": "every position of the prompt (condition='all')",
}


def load_generator(workdir: str | Path, *, step: int | None = None, use_ema: bool | None = None):
  """(run, generator params, step) of a workdir's checkpoint, without loading the frozen MLLM/VAE.

  train/restore.restore_run without the frozen weights: an export needs only the DiT and RQA (and reads a real VAE
  from its own folder), and loading a 2B-parameter MLLM for nothing would dominate the export.
  """

  try:
    return restore.restore_run(str(workdir), step=step, use_ema=use_ema, load_frozen=False)
  except restore.RunRestoreError as e:
    raise ConvertError(str(e)) from None


def export_workdir(
    workdir: str | Path,
    dst: str | Path,
    *,
    use_ema: bool | None = None,
    step: int | None = None,
    dtype=None,
    overwrite: bool = False,
) -> dict:
  """Write the pipeline folder for `workdir`'s checkpoint (latest unless `step`); returns iomm_pipeline.json.

  `use_ema`: None takes the run's own config.sample.use_ema, as `sample` does."""

  saved = restore.load_config(str(workdir))
  problem = _rqa_refusal(workdir, saved, "to a pipeline folder") or _prediction_refusal(workdir, saved)
  if problem:
    raise ConvertError(problem)
  if use_ema is None:
    use_ema = bool(saved.sample.use_ema)
  problem = output_folder.replace_problem(
      dst, flag="--dst", markers=(PIPELINE_FILE,), overwrite=overwrite, source=workdir
  )
  if problem:
    raise ConvertError(problem)
  run, params, ckpt_step = load_generator(workdir, step=step, use_ema=use_ema)
  with write_failures.writing(dst), output_folder.replacing(dst) as tmp:  # old folder kept until the new is whole
    return _write_pipeline(workdir, tmp, run, params, ckpt_step, use_ema=use_ema, dtype=dtype)


def _rqa_refusal(workdir, saved, what: str) -> str | None:
  rqa_kind = saved.model.rqa.kind
  if rqa_kind == "rqa":
    return None
  return (
      f"{workdir} was trained with config.model.rqa.kind={rqa_kind!r} (an ablation): the PyTorch adapter "
      f"(iomm_jax.convert.torch_rqa.TorchRQA) is the paper's RQA only, so only rqa.kind='rqa' runs export {what}; "
      "sample it here with python -m iomm_jax.sample"
  )


def _prediction_refusal(workdir, saved) -> str | None:
  prediction = saved.model.prediction
  if prediction == "v":
    return None
  return (
      f"{workdir} was trained with config.model.prediction={prediction!r}: its DiT predicts the clean "
      "latent, while diffusers' Flux/Z-Image pipelines read the output as a velocity; only "
      "prediction='v' runs export to a pipeline folder (its DiT alone exports: --component transformer)"
  )


def _weights(config, use_ema: bool) -> str:
  """Which of the checkpoint's weights restore_run read: its EMA only when asked and the run keeps one."""
  return "ema" if (use_ema and config.train.ema_decay > 0) else "params"


def frozen_component_problem(workdir, config, component: str) -> str:
  """One line for `--component vae|mllm --src WORKDIR`: frozen in training, so not in the checkpoints; where the
  run reads it from, and what to do instead."""
  what = {"vae": "autoencoder", "mllm": "MLLM"}.get(component, component)
  head = f"--component {component}: {workdir} does not train its {what} (frozen), so its checkpoints hold none;"
  if component == "vae":
    ae = config.model.autoencoder
    if ae.kind != "flux_vae":
      return (
          f"{head} it uses the '{ae.kind}' autoencoder (config.model.autoencoder.kind), which has no weights: "
          "there is nothing to export"
      )
    if ae.path:
      return (
          f"{head} it reads the frozen FLUX VAE from config.model.autoencoder.path={ae.path}, a diffusers "
          "AutoencoderKL folder already: use that folder as it is"
      )
    pipeline = _rqa_refusal(workdir, config, "") is None and _prediction_refusal(workdir, config) is None
    where = (
        "to-torch --src WORKDIR without --component writes it as the pipeline folder's vae/"
        if pipeline
        else "no folder holds it"
    )
    return (
        f"{head} it builds a random-init FLUX VAE (config.model.autoencoder.path is '', seeded by config.seed): "
        f"{where}; train with --config.model.autoencoder.path=DIR for a real one"
    )
  if component == "mllm":
    path = config.model.mllm.path
    if path:
      return (
          f"{head} it reads the frozen MLLM from config.model.mllm.path={path}, a transformers InternVL (-hf) "
          "folder already: use that folder as it is"
      )
    return (
        f"{head} it builds a random InternVL from config.model.mllm.arch (config.model.mllm.path is '', seeded by "
        "config.seed) that no file holds; for real weights train one with python -m iomm_jax.pretrain_mllm and pass "
        "--config.model.mllm.path=DIR"
    )
  raise ValueError(f"--component {component}: not a frozen component")


TRAINED_COMPONENTS = ("transformer", "rqa")  # what a checkpoint holds; the MLLM and the autoencoder are frozen


def component_from_workdir(
    workdir: str | Path, component: str, *, use_ema: bool | None = None, step: int | None = None
) -> tuple[components.Spec, Any, dict[str, Any], dict]:
  """(spec, our config, {dotted path: array}, info) of one trained component of `workdir`'s checkpoint (latest unless
  `step`; `use_ema` None: the run's own config.sample.use_ema). info: workdir, checkpoint_step, weights ('ema' or
  'params') and the run's prediction ('v' or 'x': an x-predicting DiT outputs the clean latent, not a velocity).

  The transformer of any run (its config.model.dit.kind); the RQA of rqa.kind='rqa' runs only (TorchRQA is the
  paper's adapter). 'vae' and 'mllm' raise ConvertError: frozen, they are not in the checkpoints."""

  saved = restore.load_config(str(workdir))
  if component not in TRAINED_COMPONENTS:
    raise ConvertError(frozen_component_problem(workdir, saved, component))
  if component == "rqa":
    problem = _rqa_refusal(workdir, saved, "their RQA")
    if problem:
      raise ConvertError(problem)
  if use_ema is None:
    use_ema = bool(saved.sample.use_ema)
  run, params, ckpt_step = load_generator(workdir, step=step, use_ema=use_ema)
  config = run.config
  width = factory.mllm_width(run.mcfg)
  if component == "transformer":
    spec, cfg, flat = components.spec(config.model.dit.kind), factory.dit_config(config, width), _flat(params["dit"])
  else:
    spec, cfg, flat = components.spec("rqa"), factory.rqa_config(config, width), _flat(params["rqa"])
  info = {
      "workdir": str(Path(workdir).absolute()),
      "checkpoint_step": int(ckpt_step),
      "weights": _weights(config, use_ema),
      "prediction": config.model.prediction,
  }
  if component == "transformer" and config.model.prediction != "v":
    info["note"] = (
        f"this run predicts {config.model.prediction} (the clean latent), not the velocity diffusers' Flux/Z-Image "
        "pipelines read: v = (x_t - x) / t from its output x at noise level t"
    )
  return spec, cfg, flat, info


def _write_pipeline(workdir, dst: Path, run, params, ckpt_step: int, *, use_ema: bool, dtype) -> dict:
  config = run.config
  width = factory.mllm_width(run.mcfg)
  dit_kind = config.model.dit.kind
  dit_cfg = factory.dit_config(config, width)
  rqa_cfg = factory.rqa_config(config, width)
  transfer.write_torch_folder(
      components.spec(dit_kind), dit_cfg, _flat(params["dit"]), dst / "transformer", dtype=dtype
  )
  transfer.write_torch_folder(components.spec("rqa"), rqa_cfg, _flat(params["rqa"]), dst / "rqa", dtype=dtype)

  ae = config.model.autoencoder
  ae_info = {"kind": ae.kind, **{k: v for k, v in ae.to_dict().items() if k != "kind"}}
  if ae.kind == "flux_vae":
    vae_spec, vae_cfg = components.spec("vae"), _vae_config(config)
    if ae.path:  # the run's VAE folder, re-written through the converter (its own precision, checked keys)
      vae_flat = transfer.torch_to_ours(vae_spec, vae_cfg, ae.path)
    else:  # a random-init VAE (dry runs): rebuild the run's frozen weights, seeded as in training

      vae_flat = _flat(builder.load_frozen_weights(config, run)["ae"])
      ae_info["note"] = "random-init FLUX VAE built by iomm_jax (train/builder.load_frozen_weights)"
    transfer.write_torch_folder(vae_spec, vae_cfg, vae_flat, dst / "vae", dtype=dtype)
    ae_info["folder"] = "vae"
  else:
    ae_info["folder"] = None
    (dst / "vae_NOTE.txt").write_text(
        f"No vae/ folder: this run uses the '{ae.kind}' autoencoder, which has no weights. Its latents are "
        f"images in [-1, 1] times scale={ae.get('scale', 1.0)}, space-to-depth folded by factor="
        f"{ae.get('factor', 1)} (NHWC); see iomm_pipeline.json 'autoencoder'.\n"
    )

  mllm = config.model.mllm
  mllm_info = {
      "path": mllm.path or None,
      "aux_prompt": mllm.aux_prompt,
      "config": internvl_keys.config_to_torch(run.mcfg)
      if mllm.path
      else components.spec("mllm").config_to_json(run.mcfg),
  }
  if not mllm.path:
    mllm_info.update(
        kind="random tiny",
        seed=config.seed + 7919,
        note="frozen random InternVL built by iomm_jax (models/factory.make_mllm) with the built-in "
        "tiny tokenizer; config above is iomm_jax's InternVLConfig",
    )
  else:
    mllm_info["kind"] = "InternVL (transformers -hf layout)"
  weights = _weights(config, use_ema)
  info = {
      "format": "iomm_pipeline",
      "version": 1,
      "workdir": str(Path(workdir).absolute()),
      "checkpoint_step": int(ckpt_step),
      "weights": weights,
      "transformer": {"folder": "transformer", "kind": dit_kind, "class": components.spec(dit_kind).torch_class},
      "rqa": {"folder": "rqa", "class": "iomm_jax.convert.torch_rqa.TorchRQA"},
      "mllm": mllm_info,
      "autoencoder": ae_info,
      "mask_ratio": config.train.mask_ratio,
      "condition": config.model.condition,
      "max_text_tokens": config.data.max_text_tokens,
      # time_shift: the Euler grid t_i = s·u_i / (1 + (s − 1)·u_i) over uniform u_i from 1 to 0, as training's shift
      "sampling": {
          "steps": config.sample.steps,
          "cfg_scale": config.sample.cfg_scale,
          "time_shift": config.train.time_shift,
      },
      "resolution": config.data.resolution,
      "conventions": {
          "flow": "x_t = (1 - t) x + t z, t=1 is noise, the DiT predicts v = z - x; Euler from t=1 to t=0 on the "
          "grid t = s u / (1 + (s - 1) u), u uniform from 1 to 0, s = sampling.time_shift (1: uniform)",
          "mmdit_inputs": "packed 2x2 latent tokens (FluxPipeline._pack_latents order), timestep = t in [0, 1], "
          f"encoder_hidden_states = LLM hidden states at {_CONDITION_POSITIONS[config.model.condition]}, "
          "pooled_projections "
          "= their mean, txt_ids zeros, img_ids (0, row, col)",
          "s3dit_inputs": "diffusers Z-Image convention: its output equals -v at timestep 1 - t",
          "cfg": "v = v_u + w (v_c - v_u), v_u from the empty-prompt template",
      },
  }
  (dst / PIPELINE_FILE).write_text(json.dumps(info, indent=2, default=str))
  return info
