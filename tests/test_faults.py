"""Fast fault cases while a run trains: the workdir lock, the non-finite guard, a metrics row cut short or not
written. Checkpoint faults are in tests/test_checkpoint_faults.py, mistakes a person can act on in
tests/test_user_errors.py; end-to-end runs of each fault are in bench/faults.py; SIGTERM / SIGUSR1 in
tests/test_preemption.py."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from iomm_jax.train import guard
from iomm_jax.train import lock as lock_lib
from iomm_jax.train.user_errors import USER_ERRORS

# ---- one trainer per workdir ------------------------------------------------------------------------------------


def test_second_trainer_is_refused_naming_the_holder(tmp_path):
  with lock_lib.WorkdirLock(str(tmp_path)) as first:
    assert first.held
    holder = json.loads((tmp_path / lock_lib.LOCK_NAME).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["start"]
    # Another process (a live pid that is not ours) holds it: write its record and try.
    (tmp_path / lock_lib.LOCK_NAME).write_text(json.dumps(dict(holder, pid=os.getppid())))
    with pytest.raises(lock_lib.WorkdirLockedError, match=f"pid {os.getppid()}"):
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
    (tmp_path / lock_lib.LOCK_NAME).write_text(json.dumps(holder))
  assert not (tmp_path / lock_lib.LOCK_NAME).exists(), "the lock is released on exit"


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  pid = int(dead.stdout)
  (tmp_path / lock_lib.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "start": "x"}))
  lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
  try:
    assert lock.took_over and f"pid {pid}" in lock.took_over and "gone" in lock.took_over
    assert json.loads((tmp_path / lock_lib.LOCK_NAME).read_text())["pid"] == os.getpid()
  finally:
    lock.release()


def test_lock_of_a_killed_trainer_not_yet_reaped_is_taken_over(tmp_path):
  """SIGKILLed, a trainer is a zombie until its parent reaps it (seconds, or for good where nothing does): signal 0
  still reaches it, yet it holds nothing."""
  zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    zombie.kill()
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # dead, and left unreaped
    (tmp_path / lock_lib.LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": zombie.pid, "start": "x"})
    )
    lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert lock.took_over and f"pid {zombie.pid}" in lock.took_over
    lock.release()
  finally:
    zombie.wait()


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
  path = tmp_path / lock_lib.LOCK_NAME
  path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": "x"}))
  with pytest.raises(lock_lib.WorkdirLockedError, match="host elsewhere"):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  old = os.path.getmtime(path) - lock_lib.STALE_AFTER_S - 10
  os.utime(path, (old, old))
  lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
  assert "not refreshed" in lock.took_over
  lock.release()


# ---- non-finite guard -------------------------------------------------------------------------------------------


def test_nonfinite_rows_stop_naming_the_step_and_values():
  rows = [
      {"loss": 1.0, "grad_norm": 2.0},
      {"loss": 3.0, "grad_norm": float("inf")},
      {"loss": float("nan"), "grad_norm": 1.0},
  ]
  assert guard.first_nonfinite(rows, 11) == (12, 3.0, float("inf"))
  with pytest.raises(guard.NonFiniteError, match=r"step 12: loss=3.0 grad_norm=inf.*checkpoint \(step 10\)"):
    guard.check_rows(rows, 11, 10)
  guard.check_rows(rows[:1], 11, 10)  # finite: no error


def test_tree_is_finite():
  tree = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2))}, "k": jax.random.key(0), "i": jnp.arange(3)}
  assert guard.tree_is_finite(tree)
  tree["b"]["c"] = tree["b"]["c"].at[1, 1].set(jnp.nan)
  assert not guard.tree_is_finite(tree)


@pytest.mark.slow
def test_divergent_run_stops_or_skips_end_to_end(tmp_path):
  """lr 1e4 diverges within a few steps: 'stop' raises naming the step and saves nothing non-finite; 'skip' finishes
  with the skipped updates counted and only finite checkpoints on disk."""
  from helpers import tiny_config
  from iomm_jax import metrics
  from iomm_jax.train import checkpoint as ckpt_lib
  from iomm_jax.train import loop

  def cfg(mode):
    c = tiny_config("pretrain,short", train__lr=1e4, train__warmup_steps=0, train__on_nonfinite=mode)
    c.train.num_steps, c.train.log_every, c.train.ckpt_every, c.train.sample_every = 12, 2, 4, 0
    return c

  stop = tmp_path / "stop"
  with pytest.raises(guard.NonFiniteError, match=r"non-finite .*step \d+") as err:
    loop.train(cfg("stop"), str(stop))
  bad_step = int(re.search(r"step (\d+)", str(err.value)).group(1))
  assert all(s < bad_step for s in ckpt_lib.Checkpointer(str(stop)).steps_on_disk())  # nothing saved at/after it

  skip = tmp_path / "skip"
  assert loop.train(cfg("skip"), str(skip))["step"] == 12
  assert metrics.read_metrics(str(skip))[-1]["nonfinite_total"] > 0
  # Resuming checks every restored tree for NaN/Inf: the final checkpoint is finite, nothing is moved aside.
  assert loop.train(cfg("skip"), str(skip))["step"] == 12
  assert not (skip / "damaged_checkpoints").exists()


# ---- metrics.jsonl cut short ------------------------------------------------------------------------------------


def test_a_metrics_row_cut_short_by_a_kill_is_dropped_and_the_resume_relogs_it(tmp_path):
  from iomm_jax import metrics

  w = metrics.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    w.scalars(step, {"loss": 0.5 / step})
  w.close()
  path = tmp_path / "metrics.jsonl"
  with open(path, "a") as f:
    f.write('{"step": 4, "lo')  # the append a SIGKILL or a full disk interrupted
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]
  w = metrics.MetricsWriter(str(tmp_path))
  assert w.truncate_after(2) == 1  # the resume from step 2 drops step 3 (and the torn row) before re-logging
  w.scalars(3, {"loss": 0.1})
  w.close()
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]
  assert path.read_text().endswith("}\n")
  # A damaged row anywhere else is not a kill's doing: one error naming the line.
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics row"):
    metrics.read_metrics(str(tmp_path))


def test_a_metrics_rewrite_that_fails_midway_leaves_the_old_file_whole(tmp_path, monkeypatch):
  from iomm_jax import metrics

  w = metrics.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    w.scalars(step, {"loss": 0.5 / step})
  w.close()
  before = sorted(os.listdir(tmp_path)), (tmp_path / "metrics.jsonl").read_text()
  dumps, calls = json.dumps, []

  def dumps_then_fail(obj, *a, **kw):  # the rewrite dies (a full disk, a kill) after its first row
    calls.append(obj)
    if len(calls) > 1:
      raise OSError(28, "No space left on device")
    return dumps(obj, *a, **kw)

  monkeypatch.setattr(json, "dumps", dumps_then_fail)
  with pytest.raises(OSError, match="No space left"):
    metrics.MetricsWriter(str(tmp_path)).truncate_after(2)
  monkeypatch.undo()
  assert (sorted(os.listdir(tmp_path)), (tmp_path / "metrics.jsonl").read_text()) == before  # no temporary file


def test_a_metrics_row_that_cannot_be_written_is_one_error_saying_what_to_do(tmp_path):
  from iomm_jax import metrics

  w = metrics.MetricsWriter(str(tmp_path))
  w.path = "/dev/full"  # every write fails with ENOSPC, as on a full disk
  with pytest.raises(metrics.MetricsWriteError, match=r"/dev/full: cannot log step 7 \(No space left on device\)"):
    w.scalars(7, {"loss": 1.0})
  w.close()
  assert issubclass(metrics.MetricsWriteError, USER_ERRORS)  # the apps print it in one line


_TENSORBOARD_ON_A_FULL_DISK = """
import os, sys, time
from iomm_jax.metrics import MetricsWriter
w = MetricsWriter(sys.argv[1])
w.scalars(1, {"loss": 0.5})
try:
  with open(os.path.join(sys.argv[1], "filler"), "wb") as f:
    f.write(b"x" * (1 << 20))
except OSError:
  pass
for i in range(300):  # rows of 20 values, more than tensorboardX's own queue of 10 holds
  tb = w._tensorboard()
  if tb is not None:
    for k in range(20):
      tb.add_scalar(f"v{k}", float(i), i)
  time.sleep(0.01)
print("dropped" if w._tb is None else "kept", flush=True)
w.close()
print("closed", flush=True)
"""


def test_tensorboard_on_a_full_disk_stops_with_one_line_and_never_hangs_the_run(tmp_path):
  """tensorboardX's writer thread dies on a full disk; its queue then blocked the next logged row for ever and its
  close raised through the trainer's cleanup (leaving the lock). Now: one note, the run goes on, no traceback."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here")
  try:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run(
        [sys.executable, "-c", _TENSORBOARD_ON_A_FULL_DISK, str(mnt / "w")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)
  assert r.returncode == 0 and r.stdout.split() == ["dropped", "closed"], (r.stdout, r.stderr[-2000:])
  assert r.stderr.strip().splitlines() == [
      f"note: TensorBoard events under {mnt / 'w'} stopped (No space left on device); metrics.jsonl keeps every "
      "logged row"
  ], r.stderr[-2000:]
