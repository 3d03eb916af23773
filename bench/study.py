"""The paper's ablations at small scale: train every arm of a study at equal compute from one tiny MLLM, score each
with mini-GenEval and the reconstruction check, and write one JSON line per arm, a markdown table and a plot.

  python bench/study.py --study=recipes    --mllm=runs/tiny_mllm --out=runs/study_recipes
  python bench/study.py --study=mask_ratio --mllm=runs/tiny_mllm --out=runs/study_mask_ratio
  python bench/study.py --study=mix_ratio  --mllm=runs/tiny_mllm --out=runs/study_mix_ratio
  python bench/study.py --study=components --mllm=runs/tiny_mllm --out=runs/study_components

Studies (the paper's figures beside which the README puts them):
- recipes: pre-train {image, pair} × fine-tune {image, pair, mix} (Table 9);
- mask_ratio: image-only pre-training at r ∈ {0, 0.25, 0.45, 0.65, 0.85, 0.95}, then the mix fine-tune (Fig. 4b);
- mix_ratio: one image-only pre-training, then fine-tunes at λ ∈ {0.1, 0.3, 0.5, 0.7, 0.9}, scored at several
  fine-tuning steps (Fig. 4c);
- components: the DiT on the frozen MLLM's raw output (no RQA), + RQA, + masking, and MetaQuery-style learned
  queries, scored at several fine-tuning steps (Fig. 2b, Fig. 4a).

Every arm runs `python -m iomm_jax.main` on configs/tiny.py (stage 1, then stage 2 from it with init.workdir), then
`eval_recon` and `eval_shapes`, as subprocesses. Stage-1 runs that several arms share are trained once. A finished
stage or evaluation is not redone, so an interrupted study continues where it stopped. Without --mllm the tiny MLLM
is trained first (python -m iomm_jax.pretrain_mllm). Writes <out>/arms.jsonl, <out>/table.md and <out>/plot.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import _common, study_report  # noqa: E402
from configs import tiny  # noqa: E402 — the stages' default lengths are the tiny config's own
from iomm_jax.config import parse_variant, variant_word  # noqa: E402
from iomm_jax.data_kinds import RECIPES  # noqa: E402

ROOT = _common.ROOT
CONFIG = os.path.join(ROOT, "configs", "tiny.py")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: a stage-1 run (variant + overrides) and a stage-2 run from it; `label` names it in tables."""

  label: str
  pretrain: str  # configs/tiny.py variant of stage 1
  finetune: str  # ... of stage 2
  pretrain_flags: tuple = ()  # extra --config.* overrides of stage 1 (and of stage 2, when `both`)
  finetune_flags: tuple = ()
  both: tuple = ()  # overrides of both stages (model switches)
  value: float | None = None  # the swept value (mask ratio, λ), for curves


MASK_RATIOS = (0.0, 0.25, 0.45, 0.65, 0.85, 0.95)
MIX_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def arms(study: str) -> list[Arm]:
  """The arms of `study` (module docstring)."""
  if study == "recipes":
    return [
        Arm(f"{p} + {f}", variant_word("pretrain", p), variant_word("finetune", f))
        for p in ("image", "pair")  # the paper pre-trains on images or pairs (a mix is not a pre-training recipe)
        for f in RECIPES
    ]
  if study == "mask_ratio":
    return [Arm(f"r = {r}", "pretrain", "finetune", (f"--config.train.mask_ratio={r}",), value=r) for r in MASK_RATIOS]
  if study == "mix_ratio":
    return [
        Arm(f"λ = {m}", "pretrain", "finetune", (), (f"--config.data.mix_lambda={m}",), value=m) for m in MIX_RATIOS
    ]
  if study == "components":
    no_mask = ("--config.train.mask_ratio=0.0",)
    return [
        Arm("raw (no RQA)", "pretrain", "finetune", no_mask, no_mask, both=RAW),
        Arm("+ RQA", "pretrain", "finetune", no_mask, no_mask),
        Arm("+ RQA + masking", "pretrain", "finetune"),
        Arm("MetaQuery queries", "pretrain", "finetune", both=("--config.model.rqa.kind=metaquery",)),
    ]
  raise ValueError(f"--study={study!r}: expected one of {STUDIES}")


RAW = ("--config.model.rqa.kind=none", "--config.model.condition=all")  # the DiT reads every LLM output position
STUDIES = ("recipes", "mask_ratio", "mix_ratio", "components")
CURVES = {"mix_ratio", "components"}  # studies scored at several fine-tuning steps


def _run(cmd: list[str], log: str) -> None:
  """Run one stage; its output goes to `log`; a failure stops the study naming the command and the log."""
  with open(log, "a") as f:
    f.write("$ " + " ".join(cmd) + "\n")
    f.flush()
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
  if rc:
    raise SystemExit(f"study: {' '.join(cmd[:4])} ... failed (exit {rc}); see {log}")


def _key(variant: str, flags: tuple) -> str:
  """A folder name for a stage-1 run: arms with the same variant and overrides share it."""
  tail = "_".join(f.removeprefix("--config.").replace(".", "-").replace("=", "") for f in flags)
  return variant + (f"_{tail}" if tail else "")


class Study:

  def __init__(self, args):
    self.args, self.out = args, os.path.abspath(args.out)
    os.makedirs(self.out, exist_ok=True)
    self.log = os.path.join(self.out, "study.log")
    self.random_mllm = args.mllm == "random"  # smoke tests: the random tiny MLLM (understands nothing)
    self.mllm = os.path.abspath(args.mllm) if args.mllm else os.path.join(self.out, "tiny_mllm")

  def common(self) -> list[str]:
    a = self.args
    out = [] if self.random_mllm else [f"--config.model.mllm.path={self.mllm}"]
    out += [f"--config.seed={a.seed}", "--config.train.eval_every=0"]
    return out + ["--config.train.sample_every=0"]

  def ensure_mllm(self) -> None:
    if self.random_mllm or os.path.exists(os.path.join(self.mllm, "config.json")):
      return
    _run(
        [sys.executable, "-m", "iomm_jax.pretrain_mllm", f"--config={ROOT}/configs/tiny_mllm.py", f"--out={self.mllm}"],
        self.log,
    )

  def stage(self, variant: str, flags: tuple, workdir: str, steps: int, init: str | None = None) -> None:
    """Train `workdir` to `steps` (resuming what is there; nothing to do when it is already there)."""
    done = os.path.join(workdir, f"done_{steps}")
    if os.path.exists(done):
      return
    cmd = [sys.executable, "-m", "iomm_jax.main", f"--config={CONFIG}:{variant}", f"--workdir={workdir}"]
    cmd += self.common() + list(flags)
    cmd += [f"--config.train.num_steps={self.total(variant)}", f"--config.train.ckpt_every={steps}"]
    if init:
      cmd.append(f"--config.init.workdir={init}")
    _run(cmd + [f"--max_steps={steps - self.trained(workdir)}"], self.log)
    open(done, "w").close()

  def total(self, variant: str) -> int:
    return self.args.pretrain_steps if parse_variant(variant)[0] == "pretrain" else self.args.finetune_steps

  @staticmethod
  def trained(workdir: str) -> int:
    done = (
        [int(n.split("_")[1]) for n in os.listdir(workdir) if n.startswith("done_")] if os.path.isdir(workdir) else []
    )
    return max(done, default=0)

  def evaluate(self, workdir: str, steps: int) -> dict:
    """mini-GenEval and reconstruction of `workdir`'s latest checkpoint (cached per step in <workdir>/study_<step>)."""
    path = os.path.join(workdir, f"study_eval_{steps}.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    a = self.args
    _run([sys.executable, "-m", "iomm_jax.eval_recon", f"--workdir={workdir}", f"--num={a.recon_num}"], self.log)
    _run([sys.executable, "-m", "iomm_jax.eval_shapes", f"--workdir={workdir}", f"--num={a.eval_num}"], self.log)
    from iomm_jax import demo_summary

    figures = demo_summary.collect(self.mllm, workdir)
    result = {"geneval": figures.get("geneval", {}), "recon": figures.get("recon", {})}
    result["geneval_chance"] = figures.get("geneval_chance", {})
    with open(path, "w") as f:
      json.dump(result, f)
    return result

  def arm(self, arm: Arm) -> list[dict]:
    a = self.args
    pre_flags = arm.pretrain_flags + arm.both
    pre = os.path.join(self.out, "stage1", _key(arm.pretrain, pre_flags))
    t0 = time.perf_counter()
    self.stage(arm.pretrain, pre_flags, pre, a.pretrain_steps)
    ft = os.path.join(
        self.out,
        "stage2",
        arm.label.replace(" ", "").replace("+", "_").replace("=", "").replace("(", "").replace(")", ""),
    )
    points = sorted(set(a.curve_steps if self.args.study in CURVES else ()) | {a.finetune_steps})
    rows = []
    for steps in points:
      cached = os.path.exists(os.path.join(ft, f"study_eval_{steps}.json"))
      if not cached and steps < self.trained(ft):  # a checkpoint older than the latest is not kept
        print(f"study: {arm.label}: no score at {steps} fine-tuning steps (trained past it); skipped", flush=True)
        continue
      self.stage(arm.finetune, arm.finetune_flags + arm.both, ft, steps, init=pre)
      figures = self.evaluate(ft, steps)
      rows.append(
          {
              "study": a.study,
              "arm": arm.label,
              "value": arm.value,
              "pretrain": arm.pretrain,
              "finetune": arm.finetune,
              "overrides": list(pre_flags + arm.finetune_flags),
              "seed": a.seed,
              "pretrain_steps": a.pretrain_steps,
              "finetune_steps": steps,
              **figures,
              "seconds": round(time.perf_counter() - t0, 1),
          }
      )
    return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--study", required=True, choices=STUDIES)
  ap.add_argument("--out", required=True, help="folder for the runs, arms.jsonl, table.md and plot.png")
  ap.add_argument(
      "--mllm", default="", help="a tiny MLLM folder (pretrain_mllm --out); '' = train one into --out; 'random' = none"
  )
  ap.add_argument("--seeds", type=_common.counts(0), default="0", help="comma-separated seeds; several give the spread")
  steps = {stage: int(tiny.get_config(stage).train.num_steps) for stage in ("pretrain", "finetune")}
  ap.add_argument(
      "--pretrain_steps",
      type=_common.count(),
      default=steps["pretrain"],
      help="stage 1 steps (default: configs/tiny.py's)",
  )
  ap.add_argument(
      "--finetune_steps",
      type=_common.count(),
      default=steps["finetune"],
      help="stage 2 steps (default: configs/tiny.py's)",
  )
  ap.add_argument(
      "--curve_steps", type=_common.counts(), default="200,400", help="extra fine-tuning steps scored in curve studies"
  )
  ap.add_argument("--eval_num", type=_common.count(), default=4, help="mini-GenEval samples per prompt")
  ap.add_argument(
      "--recon_num", type=_common.count(2), default=16, help="held-out images of the reconstruction check (2 or more)"
  )
  ap.add_argument("--arms", type=_common.counts(0), default="", help="comma-separated arm indices to run (default all)")
  args = ap.parse_args(argv)
  args.curve_steps = tuple(args.curve_steps)
  if not args.seeds:
    ap.error("argument --seeds: give one or more seeds, such as 0,1,2")
  chosen = arms(args.study)
  past = [i for i in args.arms if i >= len(chosen)]
  if past:
    ap.error(f"argument --arms: {args.study} has arms 0 to {len(chosen) - 1}, not {', '.join(map(str, past))}")
  if args.arms:
    chosen = [chosen[i] for i in args.arms]
  if args.mllm not in ("", "random") and not os.path.isfile(os.path.join(args.mllm, "config.json")):
    ap.error(
        f"argument --mllm: {args.mllm} holds no MLLM (no config.json); give a pretrain_mllm --out folder, '' to "
        "train one into --out, or 'random'"
    )
  rows = []
  for seed in args.seeds:
    args.seed = seed
    out = args.out
    args.out = os.path.join(out, f"seed{seed}")
    study = Study(args)
    study.ensure_mllm()
    for arm in chosen:
      for row in study.arm(arm):
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out = out
  study_report.write(args.out, args.study, rows)
  return 0


if __name__ == "__main__":
  sys.exit(_common.run(main))
