"""`python -m iomm_jax.convert verify`: our model vs the PyTorch reference on the same random inputs.

Sources:
  --src TORCH_PATH            both sides read the same PyTorch checkpoint; ours through the key table (checks the
                              port and the mapping);
  --src TORCH_PATH --jax DIR  ours reads the converted component directory, torch the original (checks a
                              conversion: tampered or wrongly converted weights fail); the tensors are compared too;
  --src DIR                   a component directory alone: torch gets its weights through to_torch.
Diffs are max|ours − theirs| and that divided by max(1, max|theirs|); above `tol` (1e-4 relative) fails. An MLLM
folder's tokenizer is loaded too, as training loads it ("tokenizer" in the report): one that cannot load fails verify,
the error naming the file; a size or image-token id that disagrees with config.json is listed under its "warnings".
torch is imported here only.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iomm_jax.weights import components, io, load_internvl, orbax_io, transfer
from iomm_jax.weights.components import ConvertError
from iomm_jax.models.internvl_keys import MLLMCheckpointError
from iomm_jax.models import factory, latents
from iomm_jax.models.processor import load_processor
from iomm_jax.convert.internvl_verify import MLLM_PARTS, verify_mllm


def diffs(ours, theirs) -> dict:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  if ours.shape != theirs.shape:
    return {
        "max_abs_diff": float("inf"),
        "max_rel_diff": float("inf"),
        "scale": None,
        "error": f"shape {ours.shape} vs {theirs.shape}",
    }
  max_abs = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
  scale = max(1.0, float(np.max(np.abs(theirs)))) if theirs.size else 1.0
  return {"max_abs_diff": max_abs, "max_rel_diff": max_abs / scale, "scale": scale}


def _jit_call(model, fn, *args):
  graphdef, state = nnx.split(model)
  with jax.default_matmul_precision("highest"):
    return jax.tree_util.tree_map(np.asarray, jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args))


def _torch_module(spec, cfg, tensors: dict):
  """The reference module (fp32, eval) holding `tensors` (checkpoint-file keys), loaded strictly."""
  import torch

  cls = getattr(importlib.import_module(spec.torch_module), spec.torch_class)
  kw = spec.config_to_torch(cfg)
  module = cls(**kw)
  sd = {k: torch.from_numpy(np.asarray(v, np.float32).copy()) for k, v in tensors.items()}
  module.load_state_dict(sd, strict=True)
  return module.float().eval()


def _compare_mmdit(ours, theirs, cfg, rng) -> dict:
  import torch

  b, (gh, gw), lc = 2, (2, 3), 5
  x = rng.standard_normal((b, gh * gw, cfg.in_channels)).astype(np.float32)
  h = rng.standard_normal((b, lc, cfg.joint_attention_dim)).astype(np.float32)
  pooled = rng.standard_normal((b, cfg.pooled_projection_dim)).astype(np.float32)
  t = rng.uniform(0.05, 0.95, (b,)).astype(np.float32)
  img_ids, txt_ids = np.array(latents.image_ids(gh, gw)), np.array(latents.text_ids(lc))
  out = _jit_call(ours, lambda m, *a: m(*a), x, h, pooled, t, img_ids, txt_ids)
  with torch.no_grad():
    ref = theirs(
        hidden_states=torch.from_numpy(x),
        encoder_hidden_states=torch.from_numpy(h),
        pooled_projections=torch.from_numpy(pooled),
        timestep=torch.from_numpy(t),
        img_ids=torch.from_numpy(img_ids),
        txt_ids=torch.from_numpy(txt_ids),
        return_dict=False,
    )[0]
  return {"velocity": diffs(out, ref.numpy())}


def _compare_s3dit(ours, theirs, cfg, rng) -> dict:
  import torch

  p, b, lc = cfg.all_patch_size[0], 2, 7
  lat = rng.standard_normal((b, 2 * p, 3 * p, cfg.in_channels)).astype(np.float32)
  cap = rng.standard_normal((b, lc, cfg.cap_feat_dim)).astype(np.float32)
  t = rng.uniform(0.05, 0.95, (b,)).astype(np.float32)
  mask = np.ones((b, lc), bool)
  out = _jit_call(ours, lambda m, *a: m(*a), lat, t, cap, mask)
  with torch.no_grad():  # Z-Image's clock and sign: ours(x, t, c) == −theirs([x], 1 − t, [c])
    ref = theirs(
        [torch.from_numpy(l).permute(2, 0, 1).unsqueeze(1) for l in lat],
        torch.from_numpy(1.0 - t),
        [torch.from_numpy(c) for c in cap],
        patch_size=p,
        return_dict=False,
    )[0]
  ref = -torch.stack(ref).squeeze(2).permute(0, 2, 3, 1).numpy()
  return {"velocity": diffs(out, ref)}


def _compare_vae(ours, theirs, cfg, rng) -> dict:
  import torch

  size = 2 * cfg.downsample
  images = rng.uniform(-1, 1, (1, size, size + cfg.downsample, cfg.in_channels)).astype(np.float32)
  mean = _jit_call(ours, lambda m, x: m.moments(x)[0], images)
  z = rng.standard_normal(mean.shape).astype(np.float32)
  dec = _jit_call(ours, lambda m, l: m.decode(l), z)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    ref_mean = theirs.encode(nchw(images)).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
    raw = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    ref_dec = theirs.decode(nchw(raw)).sample.numpy().transpose(0, 2, 3, 1)
  return {"encode_mean": diffs(mean, ref_mean), "decode": diffs(dec, ref_dec)}


def _compare_rqa(ours, theirs, cfg, rng) -> dict:
  import torch

  b, length = 2, 9
  c = rng.standard_normal((b, length, cfg.dim)).astype(np.float32)
  mask = np.ones((b, length), bool)
  mask[1, 5:] = False
  out = _jit_call(ours, lambda m, *a: m(*a), c, mask)
  with torch.no_grad():
    ref = theirs(torch.from_numpy(c), torch.from_numpy(mask)).numpy()
  return {"queries": diffs(out, ref)}


_COMPARE = {"mmdit": _compare_mmdit, "s3dit": _compare_s3dit, "vae": _compare_vae, "rqa": _compare_rqa}


def _weights_diff(ours_torch: dict, source: dict) -> dict:
  """Tensor-by-tensor comparison of two checkpoints in the same key layout (worst tensor reported)."""
  if sorted(ours_torch) != sorted(source):
    return {"max_abs_diff": float("inf"), "max_rel_diff": float("inf"), "scale": None, "error": "different key sets"}
  worst = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "scale": 1.0, "key": None}
  for k, v in source.items():
    d = diffs(np.asarray(ours_torch[k], np.float32), np.asarray(v, np.float32))
    if d["max_rel_diff"] > worst["max_rel_diff"]:
      worst = {**d, "key": k}
  return worst


def verify(
    component: str,
    src: str | Path,
    *,
    jax_dir: str | Path | None = None,
    config_path=None,
    seed: int = 0,
    tol: float = 1e-4,
) -> dict[str, Any]:
  """Run the comparison; returns the report (see module doc) with 'passed'."""
  rng = np.random.default_rng(seed)
  if orbax_io.is_component_dir(src):
    if jax_dir:
      raise ConvertError("--src is already a component directory; give the PyTorch checkpoint as --src with --jax")
    meta, flat = orbax_io.load(src)
    _check_component(meta, component, src)
    spec = components.spec(meta["kind"])
    cfg = spec.config_from_json(meta["config"])
    torch_tensors, source = transfer.ours_to_torch(spec, cfg, flat), f"{src} (component directory)"
  else:
    raw_cfg = transfer.read_torch_config(src, config_path)
    if component == "mllm":
      if raw_cfg is not None:
        components.check_torch_config(components.spec("mllm"), raw_cfg, transfer.torch_config_file(src, config_path))
      return _verify_mllm(src, jax_dir, seed, tol)
    if raw_cfg is None:
      raise ConvertError(f"--src={src} has no config.json beside it; pass --config CONFIG.json")
    keys = list(io.tensor_specs(src))
    spec = components.spec(components.resolve_kind(component, raw_cfg, keys))
    components.check_torch_config(spec, raw_cfg, transfer.torch_config_file(src, config_path))
    cfg = _config(spec, raw_cfg)
    torch_tensors, source = io.read_state_dict(src), str(src)
    if jax_dir:
      meta, flat = orbax_io.load(jax_dir, what="--jax")
      _check_component(meta, component, jax_dir)
      if meta["kind"] != spec.kind:
        raise ConvertError(f"--jax={jax_dir} holds a {meta['kind']}, --src a {spec.kind}")
      cfg = spec.config_from_json(meta["config"])
    else:
      flat = transfer.torch_to_ours(spec, cfg, src)
  ours = transfer.module_from_flat(spec, cfg, flat, dtype=jnp.float32)
  theirs = _torch_module(spec, cfg, torch_tensors)
  outputs = _COMPARE[spec.kind](ours, theirs, cfg, rng)
  if jax_dir:
    outputs["weights"] = _weights_diff(transfer.ours_to_torch(spec, cfg, flat), torch_tensors)
  passed = all(o["max_rel_diff"] <= tol for o in outputs.values())
  return {
      "component": spec.component,
      "kind": spec.kind,
      "source": source,
      "ours": str(jax_dir) if jax_dir else "converted in memory through the key table",
      "seed": seed,
      "tolerance_rel": tol,
      "outputs": outputs,
      "passed": passed,
  }


def _config(spec, raw_cfg):
  try:
    return spec.config_from_torch(raw_cfg)
  except (TypeError, ValueError) as e:
    raise ConvertError(f"the config does not describe a {spec.torch_class}: {e}") from e


def _check_component(meta: dict, component: str, where) -> None:
  if meta.get("component") != component:
    raise ConvertError(
        f"{where} holds a {meta.get('component')!r} component, not {component!r}; "
        f"pass --component {meta.get('component')}"
    )


def _verify_mllm(src, jax_dir, seed: int, tol: float) -> dict:
  if not Path(src).is_dir():
    raise ConvertError(f"--src={src}: mllm verify needs a transformers InternVL folder (config.json + safetensors)")
  report = verify_mllm(src, seed=seed, atol_rel=tol)
  outputs = {k: report[k] for k in MLLM_PARTS}
  if jax_dir:
    meta, flat = orbax_io.load(jax_dir, what="--jax")
    _check_component(meta, "mllm", jax_dir)
    spec = components.spec("mllm")
    cfg = spec.config_from_json(meta["config"])
    outputs["weights"] = _weights_diff(transfer.ours_to_torch(spec, cfg, flat), io.read_state_dict(src))
  tokenizer = check_tokenizer(src)
  passed = all(o["max_rel_diff"] <= tol for o in outputs.values()) and not tokenizer_problems(tokenizer)
  return {
      "component": "mllm",
      "kind": "mllm",
      "source": str(src),
      "ours": str(jax_dir) if jax_dir else "loaded by weights/load_internvl.py",
      "seed": seed,
      "tolerance_rel": tol,
      "outputs": outputs,
      "tokenizer": tokenizer,
      "passed": passed,
  }


def tokenizer_problems(tokenizer: dict) -> list[str]:
  """check_tokenizer's report → the lines that fail verify."""
  return [tokenizer["error"]] if "error" in tokenizer else list(tokenizer.get("mismatches", []))


def check_tokenizer(src) -> dict:
  """Whether `src`'s tokenizer loads as training loads it: its size and image-token id, with `mismatches` where they
  disagree with config.json (training's own check, `factory.tokenizer_mismatches`: it stops on each, so verify
  fails on them), or `error` (one line naming the file) when it cannot load."""
  try:
    processor = load_processor(src)
  except MLLMCheckpointError as e:
    return {"error": str(e)}
  cfg = load_internvl.read_config(src)
  return {
      "vocab_size": processor.vocab_size,
      "image_token_id": processor.image_token_id,
      "mismatches": factory.tokenizer_mismatches(cfg, processor, f"{src}/config.json"),
  }
