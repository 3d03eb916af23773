"""make demo's clock: the training seconds each IOMM stage gets (Makefile `stage_budget`), evaluated by make."""

import shutil
import subprocess

import pytest

from helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _budget(percent: int, overhead: int | None = None, **variables) -> int:
  """The seconds `$(call stage_budget,percent[,overhead])` gives, in a make started now with these variables."""
  call = f"$(call stage_budget,{percent}" + (f",{overhead}" if overhead is not None else "") + ")"
  show = f"show-budget: ; @echo {call}"
  args = ["make", "--no-print-directory", "-s", f"--eval={show}", "show-budget"]
  args += [f"{k}={v}" for k, v in variables.items()]
  out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
  return int(out.strip())


def test_a_stage_gets_the_time_to_its_mark_less_its_overhead():
  # 10 minutes, the mark at half: 300 s from make's start, less 30 s of overhead; a second may pass meanwhile.
  assert 268 <= _budget(50, DEMO_MINUTES=10, DEMO_STAGE_OVERHEAD_S=30) <= 270


def test_a_phase_with_its_own_overhead_subtracts_it_instead():
  # The MLLM's mark: its rendering and ViT phase (here 90 s) are not on its captioning clock.
  assert 208 <= _budget(50, 90, DEMO_MINUTES=10, DEMO_STAGE_OVERHEAD_S=30) <= 210


def test_a_late_stage_still_trains_the_minimum():
  assert _budget(50, DEMO_MINUTES=1, DEMO_STAGE_OVERHEAD_S=30, DEMO_MIN_TRAIN_S=45) == 45


def test_no_clock_means_no_budget():
  assert _budget(50, DEMO_MINUTES=0) == 0  # train.time_budget_s=0: the configured steps, whatever the time
