"""The figures `make demo` ends with: the tiny MLLM's held-out captioning, image-conditioned reconstruction and
mini-GenEval of the fine-tuned run, each beside its chance level or target.

  python -m iomm_jax.demo_summary --mllm=runs/tiny_mllm --workdir=runs/tiny

Reads <mllm>/mllm_pretrain.json, <workdir>/recon.json and <workdir>/eval_shapes.json (whichever exist), and the
steps the MLLM's captioning and each IOMM stage trained (the MLLM's report; the fine-tuned run's metrics and,
through its config.init.workdir, stage 1's: on a machine too slow for the demo's 15 minutes its clock stops a phase
early); prints a short table and then one JSON
line with every figure.
"""

from __future__ import annotations

import json
import os
import sys

from iomm_jax import metrics as metrics_lib

# The demo's targets (README): what a working tiny IOMM should reach on 2 CPU cores.
TARGETS = {
    "geneval.single_object_colour": 0.9,
    "geneval.single_object_shape": 0.7,
    "geneval.position": 0.5,
    "geneval.overall": 0.6,
    "recon.margin": 2.0,
    "recon.top1_retrieval": 0.8,
}


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _trained_steps(workdir: str) -> int | None:
  """The last training step in `workdir`'s metrics (None when it logged none)."""
  steps = [int(r["step"]) for r in metrics_lib.read_metrics(workdir) if "loss" in r]
  return max(steps) if steps else None


def training_steps(workdir: str) -> dict:
  """{'stage2_steps': ..., 'stage1_steps': ...} for the fine-tuned `workdir` and the run it started from."""
  out = {}
  config = _read(os.path.join(workdir, "config.json")) or {}
  init = config.get("init", {}).get("workdir", "")
  for name, path in (("stage1_steps", init), ("stage2_steps", workdir)):
    steps = _trained_steps(path) if path else None
    if steps is not None:
      out[name] = steps
  return out


def collect(mllm_dir: str, workdir: str) -> dict:
  """{'mllm': {...}, 'training': {...}, 'recon': {...}, 'geneval': {...}} from the files the demo's steps wrote."""
  out: dict = {}
  rep = _read(os.path.join(mllm_dir, "mllm_pretrain.json"))
  if rep:
    out["mllm"] = {k: rep["heldout"][k] for k in ("exact", "colour", "shape", "relation")}
    single = rep["heldout"].get("by_objects", {}).get("1")
    if single:  # shape on single objects: the pooled figure credits lucky guesses on multi-object scenes
      out["mllm"]["single_object_shape"] = single["shape"]
    out["mllm_chance"] = dict(rep.get("chance", {}))
    if "shape" in out["mllm_chance"]:
      out["mllm_chance"]["single_object_shape"] = out["mllm_chance"]["shape"]
  steps = training_steps(workdir)
  if rep and isinstance(rep.get("steps"), int):  # the MLLM's captioning steps (fewer if the demo's clock stopped it)
    steps = {"mllm_steps": rep["steps"], **steps}
  if steps:
    out["training"] = steps
  recon = _read(os.path.join(workdir, "recon.json"))
  if recon:
    out["recon"] = {k: recon[k] for k in ("margin", "top1_retrieval") if k in recon}
  gen = _read(os.path.join(workdir, "eval_shapes.json"))
  if gen:
    out["geneval"] = {**gen["scores"], "overall": gen["overall"], **gen.get("diagnostics", {})}
    if "chance" in gen:
      out["geneval_chance"] = gen["chance"]
  return out


def main(argv=None) -> int:
  import argparse

  ap = argparse.ArgumentParser(
      prog="python -m iomm_jax.demo_summary", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--mllm", required=True, help="the tiny MLLM folder (pretrain_mllm --out)")
  ap.add_argument("--workdir", required=True, help="the fine-tuned run")
  args = ap.parse_args(argv)
  figures = collect(args.mllm, args.workdir)
  lines = []
  for group in ("mllm", "training", "recon", "geneval"):
    chance = figures.get(f"{group}_chance", {})
    for name, value in figures.get(group, {}).items():
      target = TARGETS.get(f"{group}.{name}")
      note = f"target {target}" if target is not None else ""
      if name in chance:
        note = (note + ", " if note else "") + f"chance {chance[name]:.2f}"
      mark = "" if target is None else ("  ok" if value >= target else "  below target")
      shown = f"{value:6d}" if isinstance(value, int) else f"{value:6.3f}"
      lines.append(f"  {group + '.' + name:36s} {shown}   {note}{mark}")
  print("demo figures:\n" + "\n".join(lines))
  print(json.dumps(figures))
  return 0


if __name__ == "__main__":
  sys.exit(main())
