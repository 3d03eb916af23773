"""bench/gpu_sweep.py: the accelerator sweep's plan, its table, and a CPU smoke run with a failing point."""

import json
import os
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, ROOT)
from bench import gpu_sweep  # noqa: E402


def test_plan_varies_one_factor_at_a_time_without_repeats():
  points = gpu_sweep.plan([8, 16, 32], ["auto", "xla", "cudnn"], ["none", "full"], 16, "auto", "full")
  assert points == [
      {"batch": 8, "attention": "auto", "remat": "full"},
      {"batch": 16, "attention": "auto", "remat": "full"},
      {"batch": 32, "attention": "auto", "remat": "full"},
      {"batch": 16, "attention": "xla", "remat": "full"},
      {"batch": 16, "attention": "cudnn", "remat": "full"},
      {"batch": 16, "attention": "auto", "remat": "none"},
  ]


def test_table_shows_measured_and_estimated_memory_and_failures():
  ok = {
      "images_per_s": 31.5,
      "mfu": 0.48,
      "step_s_median": 0.254,
      "peak_memory_gb": 61.2,
      "memory_estimate_gb": 58.9,
      "compile_s": 95.0,
      "device_kind": "NVIDIA H100",
      "devices": 1,
  }
  text = gpu_sweep.table(
      [
          {"point": {"batch": 8, "attention": "cudnn", "remat": "full"}, "result": ok},
          {"point": {"batch": 32, "attention": "xla", "remat": "none"}, "result": {"error": "RESOURCE_EXHAUSTED"}},
      ]
  )
  rows = text.strip().splitlines()
  assert rows[2] == "| 8 | cudnn | full | 31.5 | 48.0% | 254.0 | 61.20 | 58.90 | 95.0 | NVIDIA H100 ×1 |"
  assert rows[3].startswith("| 32 | xla | none | failed: RESOURCE_EXHAUSTED")


def test_every_point_shares_one_compile_cache():
  points = gpu_sweep.plan([8, 16], [], [], 16, "auto", "full")
  caches = [[a for a in gpu_sweep.step_command("c.py", p, 5, [], "out/xla") if "compile" in a] for p in points]
  assert caches == [["--compile_cache=out/xla"]] * 2


def test_cpu_refused_without_allow_cpu(tmp_path, capsys):
  assert gpu_sweep.main(["--out", str(tmp_path), "--config=configs/tiny.py"]) == 3
  assert "--allow_cpu" in capsys.readouterr().out
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_smoke_run_records_a_failed_point_and_goes_on(tmp_path, capsys):
  """A point whose step fails (here an unknown attention path; on a GPU, out of memory) is recorded with its error
  line and the sweep continues; the working point carries bench/step.py's figures."""
  rc = gpu_sweep.main(
      [
          f"--out={tmp_path}",
          "--config=configs/tiny.py",
          "--batches=8",
          "--attention=auto,bogus",
          "--remat=",
          "--base_batch=8",
          "--steps=1",
          "--allow_cpu",
      ]
  )
  assert rc == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["points"] == 2 and summary["failed"] == 1
  points = [json.loads(l) for l in open(tmp_path / "points.jsonl")]
  good, bad = points
  assert good["point"] == {"batch": 8, "attention": "auto", "remat": "none"}
  assert good["images_per_s"] > 0 and good["global_batch"] == 8 and good["memory_estimate_gb"] > 0
  assert good["peak_memory_gb"] is None  # CPU keeps no device memory statistics
  assert set(good["startup_s"]) == {"build", "frozen_weights", "train_state", "compile"}
  assert bad["point"]["attention"] == "bogus" and "attention" in bad["error"]
  table = (tmp_path / "table.md").read_text()
  assert "| 8 | auto | none |" in table and "| 8 | bogus | none | failed:" in table


def test_a_timed_out_point_says_which_start_up_phase_it_finished_last():
  """On the H200 every point of the first sweep timed out with no word of where; bench/step.py now logs each phase."""
  log = gpu_sweep.PHASE_LOG
  slow_step = (
      f"import sys, time; print('{log}build 1.5 s', file=sys.stderr, flush=True); "
      f"print('{log}frozen_weights 2.0 s', file=sys.stderr, flush=True); time.sleep(60)"
  )
  result = gpu_sweep.run_point([sys.executable, "-c", slow_step], timeout_s=3)
  assert result == {"error": "timed out after 3 s; last done: frozen_weights 2.0 s"}
  assert gpu_sweep.run_point([sys.executable, "-c", "import time; time.sleep(60)"], 1) == {
      "error": "timed out after 1 s; no phase done"
  }
