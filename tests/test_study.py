"""bench/study.py: every study's arms are the paper's and their overrides are valid configs; the report writes its
table and plot; one arm runs end to end for a few steps (slow)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, load_config, subprocess_env
from iomm_jax import config_validation

sys.path.insert(0, ROOT)
from bench import study, study_report  # noqa: E402


def _apply(c, flags):
  """Apply '--config.a.b=v' strings to config c as main's flags would."""
  for f in flags:
    key, value = f.removeprefix("--config.").split("=", 1)
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], str) else value
  return c


def test_recipes_are_the_papers_six():
  pairs = {(a.pretrain, a.finetune) for a in study.arms("recipes")}
  assert pairs == {
      (p, f) for p in ("pretrain", "pair_pretrain") for f in ("finetune_image", "finetune_pair", "finetune")
  }
  assert set(study_report.PAPER["recipes"]) == {a.label for a in study.arms("recipes")}


def test_sweeps_and_components():
  assert [a.value for a in study.arms("mask_ratio")] == [0.0, 0.25, 0.45, 0.65, 0.85, 0.95]
  assert [a.value for a in study.arms("mix_ratio")] == [0.1, 0.3, 0.5, 0.7, 0.9]
  labels = [a.label for a in study.arms("components")]
  assert labels == ["raw (no RQA)", "+ RQA", "+ RQA + masking", "MetaQuery queries"]
  with pytest.raises(ValueError, match="--study='bogus'"):
    study.arms("bogus")


@pytest.mark.parametrize("name", study.STUDIES)
def test_every_arms_overrides_make_a_valid_config(name):
  for arm in study.arms(name):
    for variant, flags in (
        (arm.pretrain, arm.pretrain_flags + arm.both),
        (arm.finetune, arm.finetune_flags + arm.both),
    ):
      config_validation.validate(_apply(load_config("tiny", variant), flags))
    if name == "mask_ratio":  # the swept value reaches the field it names, in the stage it sweeps
      assert _apply(load_config("tiny", arm.pretrain), arm.pretrain_flags).train.mask_ratio == arm.value
    if name == "mix_ratio":
      assert _apply(load_config("tiny", arm.finetune), arm.finetune_flags).data.mix_lambda == arm.value


def test_report_table_and_plot(tmp_path):
  rows = [
      {
          "study": "recipes",
          "arm": a,
          "seed": s,
          "finetune_steps": 600,
          "geneval": {"position": v, "overall": v + s / 100},
          "recon": {"margin": 1.5, "top1_retrieval": 0.5},
          "geneval_chance": {"overall": 0.14},
      }
      for a, v in (("image + mix", 0.4), ("image + image", 0.1))
      for s in (0, 1)
  ]
  paths = study_report.write(str(tmp_path), "recipes", rows)
  table = open(paths["table"]).read()
  assert "| image + mix | 0.40 ± 0.00 | 0.41 ± 0.01 | 1.50 ± 0.00 | 0.50 ± 0.00 | 0.89 |" in table
  assert "| image + image |" in table and "0.61 |" in table
  assert [json.loads(x)["arm"] for x in open(paths["jsonl"])] == [r["arm"] for r in rows]
  assert os.path.getsize(paths["plot"]) > 1000


def test_plot_draws_a_sweep_as_a_curve_and_steps_as_curves_per_arm(tmp_path):
  def row(arm, value, steps, overall):
    return {"arm": arm, "value": value, "finetune_steps": steps, "geneval": {"overall": overall}}

  sweep = [row(f"r = {v}", v, 600, 0.2 + v / 10) for v in (0.0, 0.45, 0.95)]
  assert study_report.plot("mask_ratio", sweep, str(tmp_path / "a.png")) == "values"
  curves = [row("λ = 0.5", 0.5, s, 0.2) for s in (200, 600)]
  assert study_report.plot("mix_ratio", curves, str(tmp_path / "b.png")) == "steps"
  bars = [row(a, None, 600, 0.2) for a in ("image + mix", "pair + pair")]
  assert study_report.plot("recipes", bars, str(tmp_path / "c.png")) == "bars"


@pytest.mark.slow
def test_one_arm_runs_end_to_end(tmp_path):
  """The 'raw' components arm (the model.rqa.kind switch) for a few steps, scored at two fine-tuning steps."""
  out = tmp_path / "study"
  cmd = [sys.executable, "bench/study.py", "--study=components", "--arms=0", "--mllm=random", f"--out={out}"]
  cmd += ["--pretrain_steps=3", "--finetune_steps=4", "--curve_steps=2", "--eval_num=1", "--recon_num=2"]
  proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  rows = [json.loads(x) for x in open(out / "arms.jsonl")]
  assert [(r["arm"], r["finetune_steps"]) for r in rows] == [("raw (no RQA)", 2), ("raw (no RQA)", 4)]
  assert all(0.0 <= r["geneval"]["overall"] <= 1.0 and "margin" in r["recon"] for r in rows)
  assert "--config.model.rqa.kind=none" in rows[0]["overrides"]
  assert (out / "table.md").exists() and (out / "plot.png").exists()


def test_stage1_folders_differ_whenever_the_overrides_do():
  keys = {
      study._key("pretrain", flags)
      for flags in [
          (),
          ("--config.train.mask_ratio=0.5",),
          ("--config.data.mix_lambda=0.5",),
          ("--config.train.mask_ratio=0.05",),
          ("--config.train.mask_ratio=0.0", *study.RAW),
      ]
  }
  assert len(keys) == 5
