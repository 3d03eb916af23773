"""train.time_budget_s: the run ends at the first step that finishes after the budget, saved as a last step, and
rerunning resumes there."""

import json

import numpy as np
import pytest

from helpers import tiny_config
from iomm_jax import config as schema
from iomm_jax import config_validation
from iomm_jax import metrics as metrics_lib
from iomm_jax.train import checkpoint, loop, time_budget


class _Clock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_budget_is_spent_after_its_seconds():
  clock = _Clock()
  budget = time_budget.TimeBudget(30.0, clock=clock)
  clock.now += 29.9
  assert not budget.spent(1)
  clock.now += 0.1
  assert budget.spent(2) and budget.elapsed() == pytest.approx(30.0)


def test_zero_budget_never_stops():
  clock = _Clock()
  budget = time_budget.TimeBudget(0.0, clock=clock)
  clock.now += 1e9
  assert not budget.spent(1)


def test_several_processes_follow_process_zero_at_check_steps(monkeypatch):
  """With more than one process the answer is process 0's (broadcast), asked only every check_every steps."""
  import jax
  from jax.experimental import multihost_utils

  sent = []

  def broadcast(x):  # process 0's clock says "not spent" although this process's says "spent"
    sent.append(int(x))
    return np.int32(0)

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
  clock = _Clock()
  budget = time_budget.TimeBudget(10.0, check_every=5, clock=clock)
  clock.now += 60
  assert not budget.spent(3) and sent == []  # not a check step: no collective
  assert not budget.spent(5) and sent == [1]  # a check step: this process's flag sent, process 0's answer taken
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: np.int32(1))
  assert budget.spent(10)


def test_negative_budget_is_refused():
  c = tiny_config()
  c.train.time_budget_s = -5.0
  with pytest.raises(schema.ConfigError, match="time_budget_s"):
    config_validation.validate(c)


def _config(**train):
  c = tiny_config()
  c.train.update(num_steps=6, warmup_steps=2, log_every=2, ckpt_every=100, sample_every=0, eval_every=0, **train)
  return c


@pytest.mark.slow
def test_spent_budget_ends_the_call_and_a_rerun_resumes(tmp_path, capsys):
  work = str(tmp_path / "run")
  # A budget of a nanosecond is spent by the end of the first step: that step is the call's last.
  first = loop.train(_config(time_budget_s=1e-9), work)
  assert first["step"] == 1 and first["stopped_by"] == "time_budget"
  ck = checkpoint.Checkpointer(work, with_data=False)
  assert ck.latest_step() == 1  # saved although ckpt_every is 100: the last step of a call is always saved
  ck.close()
  assert [r["step"] for r in metrics_lib.read_metrics(work)] == [1]  # its metrics row is written too
  saved = json.load(open(tmp_path / "run" / "config.json"))
  assert saved["train"]["time_budget_s"] == 1e-9
  # The same run without a budget resumes at step 1 and trains on to num_steps.
  second = loop.train(_config(), work)
  assert second["start_step"] == 1 and second["step"] == 6 and second["stopped_by"] == "num_steps"
  assert [r["step"] for r in metrics_lib.read_metrics(work)] == [1, 2, 4, 6]
  # A third call has nothing left to train, and says so rather than looking like a run that trained.
  capsys.readouterr()
  third = loop.train(_config(), work)
  assert third["start_step"] == third["step"] == 6
  assert "the newest checkpoint (step 6) is at or past the run's 6 steps: nothing to train" in capsys.readouterr().out
