"""Fast fault cases: the workdir lock, the non-finite guard, restore from a damaged or non-finite checkpoint, a save
that fails (full disk), config and sample errors a person can act on. End-to-end runs of each fault are in
bench/faults.py; SIGTERM / SIGUSR1 in tests/test_preemption.py."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_app
from iomm_jax import config_validation
from iomm_jax.train import checkpoint, guard
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


# ---- damaged / non-finite checkpoints ---------------------------------------------------------------------------


def _tree(value):
  return {"w": jnp.full((64, 64), value, jnp.float32), "b": jnp.arange(1000, dtype=jnp.float32) + value}


def _abstract(tree):
  return checkpoint.abstract_with_shardings(tree, jax.tree.map(lambda x: x.sharding, tree))


def _two_checkpoints(tmp_path, second=2.0):
  ck = checkpoint.Checkpointer(str(tmp_path), with_data=False, max_to_keep=5)
  ck.save(10, _tree(1.0))
  ck.save(20, _tree(second))
  ck.close()
  return checkpoint.Checkpointer(str(tmp_path), with_data=False, max_to_keep=5)


def _damage(tmp_path, step, how):
  files = sorted((tmp_path / "checkpoints" / str(step) / "state").rglob("d/*"), key=os.path.getsize)
  if how == "truncate":
    with open(files[-1], "r+b") as f:
      f.truncate(10)
  else:
    os.remove(files[-1])
  return files[-1]


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(tmp_path, how):
  ck = _two_checkpoints(tmp_path)
  _damage(tmp_path, 20, how)
  said = []
  state, step, moved = ck.restore_newest_intact(
      _abstract(_tree(0.0)), None, fallback=True, is_finite=guard.tree_is_finite, log=said.append
  )
  ck.close()
  assert step == 10 and moved == [20]
  np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
  assert len(said) == 1 and "checkpoint 20" in said[0] and "item 'state'" in said[0] and "Moved it to" in said[0]
  assert (tmp_path / checkpoint.DAMAGED_DIR / "20" / "state").is_dir(), "moved aside, not deleted"
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]


def test_damaged_checkpoint_without_fallback_is_one_clear_error(tmp_path):
  ck = _two_checkpoints(tmp_path)
  _damage(tmp_path, 20, "truncate")
  with pytest.raises(checkpoint.CheckpointRestoreError) as e:
    ck.restore_newest_intact(_abstract(_tree(0.0)), None, fallback=False, is_finite=guard.tree_is_finite)
  ck.close()
  msg = str(e.value)
  assert "checkpoint 20" in msg and "newest intact checkpoint is step 10" in msg and "\n" not in msg
  assert (tmp_path / "checkpoints" / "20").is_dir(), "nothing moved without fallback"


def test_nonfinite_checkpoint_is_not_resumed(tmp_path):
  ck = _two_checkpoints(tmp_path, second=float("nan"))
  said = []
  _, step, moved = ck.restore_newest_intact(
      _abstract(_tree(0.0)), None, fallback=True, is_finite=guard.tree_is_finite, log=said.append
  )
  ck.close()
  assert step == 10 and moved == [20] and "non-finite" in said[0]


@pytest.mark.parametrize("fallback", [True, False])
def test_a_checkpoint_of_another_shape_is_not_damage_and_stays_where_it_is(tmp_path, fallback):
  """A run whose config builds another tree (a changed width, an extra array) must not call intact checkpoints
  damaged, move them aside and train from step 0: one line naming the first difference, nothing moved."""
  ck = _two_checkpoints(tmp_path)
  wider = {"w": jnp.zeros((64, 65), jnp.float32), "b": jnp.zeros(1000, jnp.float32)}
  more = {**_tree(0.0), "extra": jnp.zeros(3, jnp.float32)}
  for tree, want in ((wider, r"\(w: stored \(64, 64\), this run \(64, 65\)\)"), (more, r"extra: in this run, not in")):
    with pytest.raises(checkpoint.CheckpointMismatchError, match=want) as e:
      ck.restore_newest_intact(_abstract(tree), None, fallback=fallback, is_finite=guard.tree_is_finite)
    assert "checkpoint 20" in str(e.value) and "not damaged" in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, USER_ERRORS)
  ck.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
  assert not (tmp_path / checkpoint.DAMAGED_DIR).exists()


# ---- a rerun with a changed config -------------------------------------------------------------------------------


def test_resume_check_names_only_the_fields_that_fix_the_train_state():
  from helpers import tiny_config
  from iomm_jax.train import resume_check

  saved = tiny_config("pretrain,short")
  # What a resume may change: the schedule, the length, budgets, intervals, EMA's rate, the compute dtype, remat.
  free = tiny_config("pretrain,short", train__lr=1e-4, train__num_steps=99, train__time_budget_s=60.0)
  free.train.log_every, free.train.ckpt_every, free.train.eval_every, free.train.ema_decay = 1, 3, 7, 0.5
  free.model.dtype, free.data.num_images = "bfloat16", 17
  free.model.dit.arch.remat = "full"
  assert resume_check.changed_fields(saved, free) == []
  # A field left to the DiT family's default is the same DiT as the default written out.
  written = tiny_config("pretrain,short")
  written.model.dit.arch.patch_size = 1  # MMDiTConfig's default
  assert resume_check.changed_fields(saved, written) == []

  fixed = tiny_config("pretrain,short", train__optimizer="muon", train__ema_decay=0.0, train__grad_clip=0.0)
  fixed.model.dit.arch.num_layers = 3
  fixed.model.rqa.num_queries = 8
  assert resume_check.changed_fields(saved, fixed) == [
      ("model.rqa.num_queries", 16, 8),
      ("train.optimizer", "adamw", "muon"),
      ("train.ema_decay", 0.99, 0.0),
      ("train.grad_clip", 1.0, 0.0),
      ("model.dit.arch.num_layers", 2, 3),
  ]
  other_kind = tiny_config("pretrain,short", model__dit__kind="s3dit")
  assert resume_check.changed_fields(saved, other_kind) == [("model.dit.kind", "mmdit", "s3dit")]


def test_a_changed_model_is_refused_before_anything_in_the_workdir_is_written_or_moved(tmp_path):
  """configs/tiny.py with num_layers=3 rerun on a workdir trained with 2: one line naming the field with both values
  and what to do; config.json, the checkpoints and everything else untouched. A config.json that already says 3 (as
  the buggy runs left it) is caught by the checkpoint's own tree, for training and for sampling alike."""
  from helpers import tiny_config
  from iomm_jax.config import ConfigError
  from iomm_jax.train import builder, loop, restore

  work = tmp_path / "run"
  old = tiny_config("pretrain,short")
  run = builder.build(old, load_frozen=False)
  ck = checkpoint.Checkpointer(str(work), with_data=False)
  # Zeros of the run's train state: the checks compare the stored tree, not its values (and skip compiling the init).
  zeros = lambda x: jax.random.key(0) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.zeros(x.shape, x.dtype)  # noqa: E731
  ck.save(10, jax.tree.map(zeros, run.abstract_state), config=json.loads(old.to_json_best_effort()))
  ck.close()
  loop.save_resolved_config(old, str(work))

  def snapshot():
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}

  before = snapshot()
  new = tiny_config("pretrain,short")
  new.model.dit.arch.num_layers = 3
  with pytest.raises(ConfigError) as e:
    loop.train(new, str(work))
  msg = str(e.value)
  assert "config.model.dit.arch.num_layers was 2 there, 3 now" in msg and "\n" not in msg
  assert "new --workdir" in msg and "--config.model.dit.arch.num_layers=2" in msg
  assert snapshot() == before

  loop.save_resolved_config(new, str(work))  # config.json overwritten, as runs did before this check existed
  before = snapshot()
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"checkpoint 10 .*transformer_blocks\.2.*not damaged"):
    loop.train(new, str(work))
  assert snapshot() == before, "nothing moved aside, nothing logged, config.json as it was"
  assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "config.json"]
  with pytest.raises(restore.RunRestoreError, match=r"checkpoint 10 .* does not fit the model .*config.json"):
    restore.restore_run(str(work), load_frozen=False)


# ---- saves that fail --------------------------------------------------------------------------------------------


def _small_fs(tmp_path):
  """A 3 MB tmpfs when this machine lets us mount one (root), else None."""
  mnt = tmp_path / "tmpfs"
  mnt.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
  return mnt if r.returncode == 0 else None


def test_failed_async_save_surfaces_at_the_next_check(tmp_path, monkeypatch):
  mnt = _small_fs(tmp_path)
  big = lambda v: {"w": jax.random.normal(jax.random.key(v), (500_000,))}  # noqa: E731  ≈2 MB, incompressible
  try:
    if mnt is None:  # no mount: make the second save fail like a full disk
      pytest.skip("cannot mount a tmpfs here")
    ck = checkpoint.Checkpointer(str(mnt), with_data=False, max_to_keep=1)
    ck.save(10, big(1))
    ck.check_save(wait=True)
    ck.save(20, big(2))
    with pytest.raises(checkpoint.SaveFailedError) as e:
      ck.check_save(wait=True)
    msg = str(e.value)
    assert "step 20" in msg and "bytes free" in msg and "needs about" in msg and "checkpoint 10 is intact" in msg
    assert "No space left" in msg and "\n" not in msg
    ck.abandon()
    ck2 = checkpoint.Checkpointer(str(mnt), with_data=False)
    restored, step = ck2.restore(_abstract(big(0)))
    ck2.abandon()
    assert step == 10
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(big(1)["w"]))
  finally:
    if mnt is not None:
      subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_low_space_warns_before_a_save(tmp_path, monkeypatch, capsys):
  ck = checkpoint.Checkpointer(str(tmp_path), with_data=False)
  ck.save(1, _tree(1.0))
  ck.check_save(wait=True)
  usage = checkpoint.shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=100))
  ck.save(2, _tree(2.0))
  monkeypatch.undo()
  ck.close()
  err = capsys.readouterr().err
  assert "warning: 100 bytes free" in err and "this save may fail" in err


# ---- errors a person can act on ---------------------------------------------------------------------------------


def test_unknown_config_field_names_nearest():
  msg = config_validation.unknown_field_message("train.lrr")
  assert msg.startswith("unknown config field config.train.lrr") and "config.train.lr" in msg
  assert "config.train.on_nonfinite" in config_validation.unknown_field_message("train.nonexistent")


@pytest.mark.slow
def test_main_config_errors_are_one_line():
  for args, want in (
      (["--config=configs/tiny.py", "--config.train.nonexistent=1"], "config.train.nonexistent"),
      (["--config=configs/tiny.py", "--config.train.lr=abc"], "could not convert"),
      (["--config=configs/no_such.py"], "no_such.py"),
      (["--config=configs/tiny.py", "--config.train.on_nonfinite=maybe"], "on_nonfinite"),
  ):
    r = run_app("iomm_jax.main", *args, "--workdir=/nonexistent/x")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("config error:") and want in lines[-1], r.stderr[-2000:]


def _unreadable_data(tmp_path, kind):
  """(data.source, data.path) of training data that cannot be used, of the given kind."""
  if kind == "missing folder":
    return "folder", tmp_path / "nope"
  if kind == "empty folder":
    (tmp_path / "empty").mkdir()
    return "folder", tmp_path / "empty"
  if kind == "zero-byte images":
    (tmp_path / "zero").mkdir()
    for i in range(3):
      (tmp_path / "zero" / f"{i}.png").write_bytes(b"")
    return "folder", tmp_path / "zero"
  if kind == "missing jsonl":
    return "jsonl", tmp_path / "nope.jsonl"
  if kind == "arrayrecord without records":
    from array_record.python import array_record_module as ar

    (tmp_path / "shards").mkdir()
    ar.ArrayRecordWriter(str(tmp_path / "shards" / "a.array_record"), "group_size:1").close()
    return "arrayrecord", tmp_path / "shards"
  raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["missing folder", "empty folder", "zero-byte images", "missing jsonl", "arrayrecord without records"]
)
def test_data_that_cannot_be_used_stops_the_run_in_one_line_before_the_workdir_is_written(tmp_path, kind):
  from helpers import tiny_config
  from iomm_jax.train import loop

  source, path = _unreadable_data(tmp_path, kind)
  work = tmp_path / "work"
  with pytest.raises(USER_ERRORS) as e:  # main prints these as one line, without a traceback
    loop.train(tiny_config("pretrain,short", data__source=source, data__path=str(path)), str(work))
  msg = str(e.value)
  assert "data.path" in msg and str(path) in msg and "\n" not in msg, msg
  assert list(work.iterdir()) == [], "no config.json, tensorboard/ or metrics for a run that cannot read its data"


@pytest.mark.slow
def test_main_data_errors_are_one_line_and_write_nothing(tmp_path):
  work = tmp_path / "work"
  r = run_app(
      "iomm_jax.main",
      "--config=configs/tiny.py:pretrain,short",
      "--config.data.source=arrayrecord",
      f"--config.data.path={tmp_path / 'no_shards'}",
      f"--workdir={work}",
  )
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  lines = [x for x in r.stderr.splitlines() if x.strip()]
  assert lines[-1].startswith("error: no ArrayRecord shards at") and "data.path" in lines[-1], r.stderr[-2000:]
  assert not work.exists() or list(work.iterdir()) == []


def test_sample_prompt_notes():
  from iomm_jax.train.generate import prompt_notes

  class Proc:

    def text_prompt_ids(self, text):
      return [1, 2] + [7] * len(text.split()) + [3]

  class Tok:
    processor, max_len = Proc(), 8

  notes = prompt_notes(Tok(), ["a red circle", "", "w " * 20])
  assert len(notes) == 2
  assert "prompt 1 is empty" in notes[0] and "unconditional" in notes[0]
  assert "prompt 2" in notes[1] and "23 template tokens" in notes[1] and "first 8" in notes[1]


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


def test_a_metrics_row_that_cannot_be_written_is_one_error_saying_what_to_do(tmp_path):
  from iomm_jax import metrics
  from iomm_jax.train.user_errors import USER_ERRORS

  w = metrics.MetricsWriter(str(tmp_path))
  w.path = "/dev/full"  # every write fails with ENOSPC, as on a full disk
  with pytest.raises(metrics.MetricsWriteError, match=r"/dev/full: cannot log step 7 \(No space left on device\)"):
    w.scalars(7, {"loss": 1.0})
  w.close()
  assert issubclass(metrics.MetricsWriteError, USER_ERRORS)  # the apps print it in one line
