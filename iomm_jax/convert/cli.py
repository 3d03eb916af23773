"""python -m iomm_jax.convert {to-jax,to-torch,verify}: move checkpoints between PyTorch and iomm_jax.

  to-jax   --component {transformer,vae,rqa,mllm} --src PATH --dst DIR [--config JSON] [--dtype float32|bfloat16]
  to-torch --component {transformer,vae,rqa,mllm} --src DIR --dst OUT [--dtype float32|bfloat16]
  to-torch --src WORKDIR [--use-ema|--no-ema] [--step N] --dst OUT     (a training workdir → pipeline folder)
  to-torch --component {transformer,rqa} --src WORKDIR [--use-ema|--no-ema] [--step N] --dst OUT [--dtype ...]
                                         (one trained component of a workdir → its PyTorch folder; x-predicting
                                         runs too; vae/mllm are frozen, not in checkpoints: one line says where)
  verify   --component {transformer,vae,rqa,mllm} --src PATH [--jax DIR] [--config JSON] [--seed 0]

Exit codes: 0 ok; 1 verify above tolerance; 2 user error (the message names what is wrong and the fix).
See iomm_jax/convert/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iomm_jax import app_exit, dtype_names, output_folder, write_failures
from iomm_jax.weights import components, io
from iomm_jax.models import keymap
from iomm_jax.weights.components import COMPONENTS, ConvertError
from iomm_jax.weights import orbax_io, transfer
from iomm_jax.convert import export
from iomm_jax.train import restore
from iomm_jax.convert import verify
from iomm_jax.models.internvl_keys import MLLMCheckpointError

USER_ERROR = 2
_DTYPE = dtype_names.argparse_type(transfer.CAST_DTYPES, "--dtype")
_DTYPE_HELP = "cast floating weights to float32 or bfloat16 (fp32, bf16 also accepted; default: keep each one's)"


def _cast(args):
  """The numpy type --dtype names, or None (keep)."""
  return dtype_names.numpy_dtype(args.dtype) if args.dtype else None


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
      prog="python -m iomm_jax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = ap.add_subparsers(dest="command", required=True)
  tj = sub.add_parser("to-jax", help="PyTorch checkpoint → component directory (Orbax + component.json)")
  tj.add_argument("--component", required=True, choices=COMPONENTS)
  tj.add_argument("--src", required=True, help="diffusers/transformers folder, .safetensors, or .pt/.bin")
  tj.add_argument("--dst", required=True, help="output component directory")
  tj.add_argument("--config", default=None, help="JSON config (needed for a bare .safetensors/.pt/.bin)")
  tj.add_argument("--dtype", type=_DTYPE, default=None, help=_DTYPE_HELP)
  tj.add_argument(
      "--overwrite", action="store_true", help="replace a --dst that this converter wrote before (never another folder)"
  )

  tt = sub.add_parser("to-torch", help="component directory (or training workdir) → PyTorch folder")
  tt.add_argument(
      "--component",
      choices=COMPONENTS,
      default=None,
      help="required unless --src is a workdir; with a workdir: transformer or rqa writes just that component's "
      "folder (without: the whole pipeline folder)",
  )
  tt.add_argument("--src", required=True, help="component directory from to-jax, or a training workdir")
  tt.add_argument("--dst", required=True, help="output folder")
  tt.add_argument("--dtype", type=_DTYPE, default=None, help=_DTYPE_HELP)
  restore.add_checkpoint_flags(tt, applies="workdir: ")
  tt.add_argument(
      "--overwrite", action="store_true", help="replace a --dst that this converter wrote before (never another folder)"
  )

  vf = sub.add_parser("verify", help="our model vs the PyTorch reference on random inputs")
  vf.add_argument("--component", required=True, choices=COMPONENTS)
  vf.add_argument("--src", required=True, help="PyTorch checkpoint (or a component directory)")
  vf.add_argument("--jax", default=None, help="a component directory converted from --src, to check it")
  vf.add_argument("--config", default=None, help="JSON config for a bare .safetensors/.pt/.bin")
  vf.add_argument("--seed", type=int, default=0)
  vf.add_argument("--tol", type=float, default=1e-4, help="max relative difference (default 1e-4)")
  return ap


def _require_exists(path: str, flag: str) -> None:
  if not Path(path).exists():
    raise ConvertError(f"{flag}={path} does not exist; check the path")


EXPORT_FILE = "iomm_export.json"  # what to-torch writes beside a component's config.json: its source, and a marker
# Files only this converter writes: --overwrite replaces a folder holding one, and nothing else (a training workdir,
# a downloaded model, the user's own folder).
OUTPUT_MARKERS = (orbax_io.META_FILE, export.PIPELINE_FILE, EXPORT_FILE)


def _check_dst(args) -> None:
  """--dst can become the output folder: checked before any conversion work, so a mistake costs nothing."""
  problem = output_folder.replace_problem(
      args.dst, flag="--dst", markers=OUTPUT_MARKERS, overwrite=args.overwrite, source=args.src
  )
  if problem:
    raise ConvertError(problem)


def to_jax(args) -> dict:
  """PyTorch checkpoint → component directory."""

  _require_exists(args.src, "--src")
  _check_dst(args)
  raw_cfg = transfer.read_torch_config(args.src, args.config)
  if raw_cfg is None:
    raise ConvertError(
        f"--src={args.src} has no config.json beside it; pass --config CONFIG.json (the "
        "diffusers/transformers config of this checkpoint)"
    )
  file_specs = io.tensor_specs(args.src)
  kind = components.resolve_kind(args.component, raw_cfg, file_specs)
  spec = components.spec(kind)
  components.check_torch_config(spec, raw_cfg, transfer.torch_config_file(args.src, args.config))
  extra = {}
  if kind == "mllm":  # keep lm_head when the checkpoint has one, so the round trip is exact
    extra["with_lm_head"] = any(spec.from_file_key(k) == "lm_head.weight" for k in file_specs)
  try:
    cfg = spec.config_from_torch(raw_cfg, **extra) if extra else spec.config_from_torch(raw_cfg)
  except (TypeError, ValueError) as e:
    raise ConvertError(f"--component {args.component}: the config does not describe a {spec.torch_class} ({e})") from e
  flat = transfer.torch_to_ours(spec, cfg, args.src, dtype=_cast(args))
  dst = orbax_io.save(
      args.dst,
      component=spec.component,
      kind=kind,
      config=spec.config_to_json(cfg),
      params=flat,
      torch_config=raw_cfg,
      source=str(Path(args.src).absolute()),
      overwrite=args.overwrite,
  )
  return {
      "wrote": str(dst),
      "component": spec.component,
      "kind": kind,
      "tensors": len(flat),
      "dtypes": sorted({str(v.dtype) for v in flat.values()}),
  }


def to_torch(args) -> dict:
  """Component directory → PyTorch folder, or a training workdir → pipeline folder (or, with --component, the
  folder of one trained component of it)."""

  _require_exists(args.src, "--src")
  _check_dst(args)
  dtype = _cast(args)
  if export.is_workdir(args.src):
    try:
      if args.component is not None:
        spec, cfg, flat, info = export.component_from_workdir(
            args.src, args.component, use_ema=args.use_ema, step=args.step
        )
        return _write_component(args.dst, spec, cfg, flat, dtype=dtype, source=args.src, **info)
      info = export.export_workdir(
          args.src, args.dst, use_ema=args.use_ema, step=args.step, dtype=dtype, overwrite=args.overwrite
      )
    except SystemExit as e:  # train.restore reports a workdir without checkpoints this way
      if isinstance(e.code, str):  # its "error: " prefix is the one the converter prints too
        raise ConvertError(e.code.removeprefix("error: ")) from e
      raise
    return {"wrote": str(Path(args.dst).absolute()), "pipeline": info}
  if args.component is None:
    raise ConvertError(
        f"--src={args.src} is not a training workdir (config.json + checkpoints/); for a component "
        "directory pass --component {transformer,vae,rqa,mllm}"
    )
  meta, flat = orbax_io.load(args.src)
  if meta["component"] != args.component:
    raise ConvertError(
        f"--src={args.src} holds a {meta['component']!r} component, not {args.component!r}; "
        f"pass --component {meta['component']}"
    )
  spec = components.spec(meta["kind"])
  cfg = spec.config_from_json(meta["config"])
  # The source's own config.json is written back when it came from PyTorch (keeps every field it had).
  return _write_component(
      args.dst, spec, cfg, flat, dtype=dtype, source=args.src, torch_config=meta.get("torch_config")
  )


def _write_component(dst, spec, cfg, flat, *, dtype, source, torch_config=None, **info) -> dict:
  """One component's PyTorch folder at DST (config.json + safetensors, and EXPORT_FILE: its source, the marker that
  lets --overwrite replace it) and what to-torch prints; `info` (a workdir's step, weights, prediction) goes in
  both."""
  dst = Path(dst)
  with write_failures.writing(dst), output_folder.replacing(dst) as tmp:  # a full disk: one OSError, nothing half
    files = transfer.write_torch_folder(spec, cfg, flat, tmp, torch_config=torch_config, dtype=dtype)
    (tmp / EXPORT_FILE).write_text(
        json.dumps(
            {"source": str(Path(source).absolute()), "component": spec.component, "kind": spec.kind, **info},
            default=str,
        )
    )
  return {
      "wrote": str(dst.absolute()),
      "component": spec.component,
      "kind": spec.kind,
      "files": [f.name for f in files],
      **info,
  }


def verify_cmd(args) -> dict:
  _require_exists(args.src, "--src")
  if args.jax:
    _require_exists(args.jax, "--jax")
  return verify.verify(
      args.component, args.src, jax_dir=args.jax, config_path=args.config, seed=args.seed, tol=args.tol
  )


def main(argv=None) -> int:
  """Entry point; returns the exit code (argparse usage errors exit 2 by themselves)."""
  args = _parser().parse_args(argv)

  try:
    if args.command == "to-jax":
      out = to_jax(args)
    elif args.command == "to-torch":
      out = to_torch(args)
    else:
      out = verify_cmd(args)
  except (
      ConvertError,
      keymap.KeyMismatchError,
      io.CheckpointNotFoundError,
      io.CheckpointUnreadableError,
      MLLMCheckpointError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    return USER_ERROR
  except OSError as e:  # a full disk, a folder made read-only meanwhile: nothing half is left at --dst
    print(f"error: {app_exit.describe(e)}", file=sys.stderr)
    return 1
  print(json.dumps(out, indent=2, default=str))
  if args.command == "verify" and not out["passed"]:
    for problem in verify.tokenizer_problems(out.get("tokenizer", {})):
      print(f"verify FAILED: {problem}", file=sys.stderr)
    if not all(o["max_rel_diff"] <= args.tol for o in out["outputs"].values()):
      print(f"verify FAILED: a difference exceeds {args.tol} relative", file=sys.stderr)
    return 1
  return 0
