"""The figures `make demo` ends with: the tiny MLLM's held-out captioning, image-conditioned reconstruction and
mini-GenEval of the fine-tuned run, each beside its chance level or target.

  python -m iomm_jax.demo_summary --mllm=runs/tiny_mllm --workdir=runs/tiny

Reads <mllm>/mllm_pretrain.json, <workdir>/recon.json and <workdir>/eval_shapes.json (whichever exist); prints a
short table and then one JSON line with every figure.
"""

from __future__ import annotations

import json
import os
import sys

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


def collect(mllm_dir: str, workdir: str) -> dict:
  """{'mllm': {...}, 'recon': {...}, 'geneval': {...}} from the files the demo's steps wrote."""
  out: dict = {}
  rep = _read(os.path.join(mllm_dir, "mllm_pretrain.json"))
  if rep:
    out["mllm"] = {k: rep["heldout"][k] for k in ("exact", "colour", "shape", "relation")}
    out["mllm_chance"] = rep.get("chance", {})
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
  for group in ("mllm", "recon", "geneval"):
    chance = figures.get(f"{group}_chance", {})
    for name, value in figures.get(group, {}).items():
      target = TARGETS.get(f"{group}.{name}")
      note = f"target {target}" if target is not None else ""
      if name in chance:
        note = (note + ", " if note else "") + f"chance {chance[name]:.2f}"
      mark = "" if target is None else ("  ok" if value >= target else "  below target")
      lines.append(f"  {group + '.' + name:36s} {value:6.3f}   {note}{mark}")
  print("demo figures:\n" + "\n".join(lines))
  print(json.dumps(figures))
  return 0


if __name__ == "__main__":
  sys.exit(main())
