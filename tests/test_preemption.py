"""Preemption: SIGTERM / SIGUSR1 save at the next step boundary and exit with EXIT_PREEMPTED (Ctrl-C: the same save,
EXIT_INTERRUPTED); the rerun resumes to the same per-step losses and final parameters as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, subprocess_env
from iomm_jax import metrics as metrics_lib
from iomm_jax.train import checkpoint
from iomm_jax.train.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED

STEPS = 30
ARGS = [
    "--config=configs/tiny.py",
    f"--config.train.num_steps={STEPS}",
    "--config.train.ckpt_every=1000",
    "--config.train.global_batch=8",
    "--config.data.num_images=256",
    "--config.train.log_every=1",
    "--config.train.sample_every=0",
    "--config.train.warmup_steps=5",
]


def _cmd(workdir):
  return [sys.executable, "-m", "iomm_jax.main", f"--workdir={workdir}", *ARGS]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(workdir))}


def _params(workdir, step):
  import orbax.checkpoint as ocp

  ck = checkpoint.Checkpointer(str(workdir), with_data=False)
  state = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  ck.close()
  return {"params": state["params"], "ema_params": state["ema_params"], "opt_state": state["opt_state"]}


def _interrupt(work, env, sig, after_step):
  """Start a run in `work`, send `sig` once it has logged `after_step`; (returncode, stderr, saved steps)."""
  proc = subprocess.Popen(
      _cmd(work),
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
      # As started from a terminal: a test run launched in the background of a non-interactive shell inherits
      # SIGINT ignored, which the run rightly keeps ignoring (preemption.PreemptionWatch), so Ctrl-C would not reach it.
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  try:
    deadline = time.time() + 500
    while max(_losses(work), default=0) < after_step:
      assert proc.poll() is None, "training exited before the signal: " + proc.stderr.read()[-2000:]
      assert time.time() < deadline, "no progress"
      time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  saved = sorted(int(p) for p in os.listdir(work / "checkpoints") if p.isdigit())
  return proc.returncode, err, saved


@pytest.mark.slow
def test_signals_save_at_the_step_and_resume_exactly(tmp_path):
  env = subprocess_env(tmp_path)
  ref = subprocess.run(_cmd(tmp_path / "ref"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert ref.returncode == 0, ref.stderr[-3000:]
  work = tmp_path / "preempted"
  rc, err, saved = _interrupt(work, env, signal.SIGTERM, 3)
  assert rc == EXIT_PREEMPTED, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  assert len(saved) == 1 and 3 <= saved[0] < STEPS, saved
  assert f"preempted by SIGTERM: saved the checkpoint at step {saved[0]}" in err
  assert max(_losses(work)) == saved[0], "every step up to the save is logged"
  first = saved[0]
  rc, err, saved = _interrupt(work, env, signal.SIGUSR1, first + 2)  # the resumed run, preempted again
  assert rc == EXIT_PREEMPTED and f"preempted by SIGUSR1: saved the checkpoint at step {saved[-1]}" in err, err[-3000:]
  assert saved[-1] > first
  second = saved[-1]
  rc, err, saved = _interrupt(work, env, signal.SIGINT, second + 2)  # Ctrl-C: the same save, the shell's exit code
  assert rc == EXIT_INTERRUPTED, err[-3000:]
  assert f"interrupted by Ctrl-C (SIGINT): saved the checkpoint at step {saved[-1]}" in err, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err and saved[-1] > second
  res = subprocess.run(_cmd(work), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  assert not (work / "trainer.lock").exists()
  a, b = _losses(tmp_path / "ref"), _losses(work)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  for s in a:
    assert a[s] == b[s], f"loss differs at step {s}: {a[s]} vs {b[s]}"
  for x, y in zip(
      jax.tree_util.tree_leaves(_params(tmp_path / "ref", STEPS)), jax.tree_util.tree_leaves(_params(work, STEPS))
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
