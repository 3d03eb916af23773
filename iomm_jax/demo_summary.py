"""The figures `make demo` ends with: the tiny MLLM's held-out captioning, image-conditioned reconstruction and
mini-GenEval of the fine-tuned run, each beside its chance level or target, and mini-GenEval's single-object figures
of the image-only stage 1 (text prompts to a generator that has never seen a caption: what it follows there it learnt
from images through the frozen MLLM, IOMM's premise).

  python -m iomm_jax.demo_summary --mllm=runs/tiny_mllm --workdir=runs/tiny

Reads <mllm>/mllm_pretrain.json, <workdir>/recon.json, <workdir>/eval_shapes.json and stage 1's eval_shapes.json
(in the fine-tuned run's config.init.workdir; whichever exist), and the
steps the MLLM's captioning and each IOMM stage trained (the MLLM's report; the fine-tuned run's metrics and,
through its config.init.workdir, stage 1's: on a machine too slow for the demo's 15 minutes its clock stops a phase
early); prints a short table and then one JSON
line with every figure. A path that lacks what it should hold is named on stderr; when no figure is found at all, or
the two paths look swapped, one line says which path lacks what and the exit status is 1.
"""

from __future__ import annotations

import json
import os
import sys

from iomm_jax import app_exit
from iomm_jax import metrics as metrics_lib
from iomm_jax import workdir_layout
from iomm_jax.mllm_pretrain import hf_folder

# The demo's targets (README): what a working tiny IOMM should reach on 2 CPU cores.
TARGETS = {
    "geneval.single_object_colour": 0.9,
    "geneval.single_object_shape": 0.7,
    "geneval.position": 0.5,
    "geneval.overall": 0.6,
    "recon.margin": 2.0,
    "recon.top1_retrieval": 0.8,
}
# What a group's lines add to their note.
GROUP_NOTES = {"geneval_stage1": "image-only stage 1, no caption seen"}


def _read(path: str) -> dict | None:
  """The JSON report or config at `path`; None when it is absent. A file cut short or edited by hand stops the
  summary in one line naming it (a config.json through workdir_layout's reader, which says how to restore it)."""
  if not os.path.exists(path):
    return None
  if os.path.basename(path) == workdir_layout.CONFIG:
    try:
      return workdir_layout.read_config_json(os.path.dirname(path))
    except workdir_layout.SavedConfigError as e:
      raise SystemExit(f"demo_summary: {e}") from None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise SystemExit(f"demo_summary: {path} is not valid JSON ({e}); rerun the step that writes it") from None


def _pick(path: str, data, fields):
  """`fields(data)`; a report of another shape than the summary reads (edited, or another version's) stops it in one
  line naming the file."""
  try:
    return fields(data)
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise SystemExit(
        f"demo_summary: {path} does not hold the fields the summary reads ({type(e).__name__}: {e}); rerun the "
        "step that writes it"
    ) from None


def _trained_steps(workdir: str) -> int | None:
  """The last training step in `workdir`'s metrics (None when it logged none)."""
  try:
    rows = metrics_lib.read_metrics(workdir)
  except metrics_lib.MetricsFileError as e:
    raise SystemExit(f"demo_summary: {e}") from None
  steps = [int(r["step"]) for r in rows if "loss" in r]
  return max(steps) if steps else None


# Stage 1's mini-GenEval figures shown: single objects carry the signal at this scale (README).
STAGE1_GENEVAL = ("single_object_colour", "single_object_shape", "overall", "single_object_dominant_colour")


def _init_workdir(workdir: str) -> str:
  """The run the fine-tuned `workdir` started from (its config.init.workdir; '' when none)."""
  path = workdir_layout.path(workdir, workdir_layout.CONFIG)
  return _pick(path, _read(path) or {}, lambda c: c.get("init", {}).get("workdir", ""))


def _geneval(workdir: str, keys=None) -> tuple[dict, dict]:
  """(figures, chance) of `workdir`'s eval_shapes.json, limited to `keys` when given; ({}, {}) when absent."""
  path = workdir_layout.path(workdir, workdir_layout.EVAL_SHAPES + ".json") if workdir else ""
  gen = _read(path) if workdir else None
  if not gen:
    return {}, {}
  figures = _pick(path, gen, lambda g: {**g["scores"], "overall": g["overall"], **g.get("diagnostics", {})})
  if keys is not None:
    figures = {k: figures[k] for k in keys if k in figures}
  return figures, dict(gen.get("chance", {}))


def training_steps(workdir: str) -> dict:
  """{'stage2_steps': ..., 'stage1_steps': ...} for the fine-tuned `workdir` and the run it started from."""
  out = {}
  for name, path in (("stage1_steps", _init_workdir(workdir)), ("stage2_steps", workdir)):
    steps = _trained_steps(path) if path else None
    if steps is not None:
      out[name] = steps
  return out


def _mllm_figures(rep: dict) -> tuple[dict, dict]:
  """(figures, chance) of the tiny MLLM's report."""
  figures = {k: rep["heldout"][k] for k in ("exact", "colour", "shape", "relation")}
  single = rep["heldout"].get("by_objects", {}).get("1")
  if single:  # shape on single objects: the pooled figure credits lucky guesses on multi-object scenes
    figures["single_object_shape"] = single["shape"]
  chance = dict(rep.get("chance", {}))
  if "shape" in chance:
    chance["single_object_shape"] = chance["shape"]
  return figures, chance


def collect(mllm_dir: str, workdir: str) -> dict:
  """{'mllm': {...}, 'training': {...}, 'recon': {...}, 'geneval_stage1': {...}, 'geneval': {...}} (with their
  chance levels) from the files the demo's steps wrote."""
  out: dict = {}
  rep_path = os.path.join(mllm_dir, hf_folder.REPORT_FILE)
  rep = _read(rep_path)
  if rep:
    out["mllm"], out["mllm_chance"] = _pick(rep_path, rep, _mllm_figures)
  steps = training_steps(workdir)
  if rep and isinstance(rep.get("steps"), int):  # the MLLM's captioning steps (fewer if the demo's clock stopped it)
    steps = {"mllm_steps": rep["steps"], **steps}
  if steps:
    out["training"] = steps
  recon_path = workdir_layout.path(workdir, workdir_layout.RECON_REPORT)
  recon = _read(recon_path)
  if recon:
    out["recon"] = _pick(recon_path, recon, lambda r: {k: v for k, v in r.items() if k in ("margin", "top1_retrieval")})
  for group, path, keys in (("geneval_stage1", _init_workdir(workdir), STAGE1_GENEVAL), ("geneval", workdir, None)):
    figures, chance = _geneval(path, keys)
    if figures:
      out[group] = figures
    if figures and chance:
      out[f"{group}_chance"] = chance
  return out


def path_problems(mllm_dir: str, workdir: str) -> tuple[list[str], bool]:
  """(what each path lacks, one line each; whether --mllm and --workdir look swapped). Empty when both hold what the
  demo writes."""
  problems, swapped = [], False
  for flag, path, what in (
      ("--mllm", mllm_dir, f"the tiny MLLM folder (pretrain_mllm --out, with {hf_folder.REPORT_FILE})"),
      ("--workdir", workdir, "the fine-tuned run (with recon.json, eval_shapes.json or metrics.jsonl)"),
  ):
    if not os.path.exists(path):
      problems.append(f"{flag}={path} does not exist; give {what}")
    elif not os.path.isdir(path):
      problems.append(f"{flag}={path} is a file; give {what}")
    elif flag == "--mllm" and not os.path.isfile(os.path.join(path, hf_folder.REPORT_FILE)):
      swapped |= workdir_layout.is_run(path)
      kind = "is a training run (config.json + checkpoints/), not" if workdir_layout.is_run(path) else "is not"
      problems.append(f"{flag}={path} {kind} {what}")
    elif flag == "--workdir" and os.path.isfile(os.path.join(path, hf_folder.REPORT_FILE)):
      swapped = True
      problems.append(f"{flag}={path} is the MLLM folder (it holds {hf_folder.REPORT_FILE}), not {what}")
    elif flag == "--workdir" and not any(
        os.path.isfile(workdir_layout.path(path, n))
        for n in (workdir_layout.RECON_REPORT, workdir_layout.EVAL_SHAPES + ".json", workdir_layout.METRICS)
    ):
      problems.append(f"{flag}={path} is not {what}")
  return problems, swapped


def main(argv=None) -> int:
  import argparse

  ap = argparse.ArgumentParser(
      prog="python -m iomm_jax.demo_summary", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--mllm", required=True, help="the tiny MLLM folder (pretrain_mllm --out)")
  ap.add_argument("--workdir", required=True, help="the fine-tuned run")
  args = ap.parse_args(argv)
  problems, swapped = path_problems(args.mllm, args.workdir)
  figures = collect(args.mllm, args.workdir)
  if swapped or not figures:  # nothing to show, or each path where the other belongs: say which lacks what
    hint = "; were --mllm and --workdir swapped?" if swapped else ""
    raise SystemExit(f"demo_summary: no figures to show: {'; '.join(problems)}{hint}")
  for problem in problems:  # a partial demo: what exists is shown, what is missing is named
    print(f"demo_summary: note: {problem}", file=sys.stderr)
  lines = []
  for group in ("mllm", "training", "recon", "geneval_stage1", "geneval"):
    chance = figures.get(f"{group}_chance", {})
    for name, value in figures.get(group, {}).items():
      target = TARGETS.get(f"{group}.{name}")
      note = ", ".join(n for n in (GROUP_NOTES.get(group), f"target {target}" if target is not None else None) if n)
      if name in chance:
        note = (note + ", " if note else "") + f"chance {chance[name]:.2f}"
      mark = "" if target is None else ("  ok" if value >= target else "  below target")
      shown = f"{value:6d}" if isinstance(value, int) else f"{value:6.3f}"
      lines.append(f"  {group + '.' + name:46s} {shown}   {note}{mark}")
  print("demo figures:\n" + "\n".join(lines))
  print(json.dumps(figures))
  return 0


if __name__ == "__main__":
  sys.exit(app_exit.run(main))
