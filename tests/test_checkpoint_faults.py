"""Checkpoint faults: damaged or non-finite checkpoints (moved aside, the newest intact one resumed), ones of another
model (left where they are), a rerun whose changed config no longer fits them (refused before anything is written),
and saves that fail (full disk) or may (low space)."""

import asyncio
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT
from iomm_jax import orphaned_reads
from iomm_jax.train import checkpoint, guard
from iomm_jax.train.user_errors import USER_ERRORS

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


_DAMAGED_READS = """
import os, sys
import jax.numpy as jnp
from iomm_jax.train import checkpoint, checkpoint_weights, guard
work = sys.argv[1]
tree = {name: {f"w{i}": jnp.full((64, 64), float(i)) for i in range(48)} for name in ("params", "ema_params")}
ck = checkpoint.Checkpointer(work, with_data=False, max_to_keep=5)
ck.save(10, tree)
ck.save(20, tree)
ck.close()
for root, _, files in os.walk(os.path.join(work, "checkpoints", "20", "state")):
  for name in files if os.path.basename(root) == "d" else ():
    os.truncate(os.path.join(root, name), 10)
reader = checkpoint_weights.WeightsReader(work)
abstract = checkpoint.abstract_with_shardings(tree["params"], {k: v.sharding for k, v in tree["params"].items()})
try:
  reader.restore(abstract, "params", 20)
except checkpoint_weights.DamagedCheckpointError as e:
  reader.abandon()
  print("READER:", e)
ck = checkpoint.Checkpointer(work, with_data=False, max_to_keep=5)
abstract = checkpoint.abstract_with_shardings(tree, jax.tree.map(lambda x: x.sharding, tree))
_, step, moved = ck.restore_newest_intact(abstract, None, fallback=True, is_finite=guard.tree_is_finite, log=print)
ck.close()
print("RESUMED:", step, moved)
"""


def test_a_damaged_checkpoint_is_its_message_without_the_abandoned_reads_tracebacks(tmp_path):
  """One unreadable file ends Orbax's read while TensorStore still reads the other arrays; what those reads report
  afterwards (hundreds of 'Event loop is closed' tracebacks, unretrieved task errors) must not bury the one line
  that names the damaged file. In a subprocess: the reports arrive until (and at) its exit."""
  code = "import jax\n" + _DAMAGED_READS
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run(
      [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  said = out.stdout.splitlines()
  assert said[0].startswith(f"READER: checkpoint 20 in {tmp_path / 'checkpoints'} could not be restored: item 'state'")
  assert "Moved it to" in said[1] and said[2] == "RESUMED: 10 [20]", said
  noise = ("Traceback", "Event loop is closed", "never retrieved", "never awaited", "Exception ignored")
  assert not [line for line in out.stderr.splitlines() if any(n in line for n in noise)], out.stderr[-3000:]


_GARBAGE_STEP_METADATA = """
import sys
import jax, jax.numpy as jnp
from iomm_jax.train import checkpoint, checkpoint_weights, guard
work = sys.argv[1]
tree = lambda v: {"params": {"w": jnp.full((8, 8), v)}, "ema_params": {"w": jnp.full((8, 8), v)}}
ck = checkpoint.Checkpointer(work, with_data=False, max_to_keep=5)
ck.save(10, tree(1.0)); ck.save(20, tree(2.0)); ck.close()
with open(f"{work}/checkpoints/20/_CHECKPOINT_METADATA", "wb") as f:
  f.write(b"\\x00garbage")
print("PHASE reader", file=sys.stderr, flush=True)
reader = checkpoint_weights.WeightsReader(work)
abstract = checkpoint.abstract_with_shardings(tree(0.0)["params"], jax.tree.map(lambda x: x.sharding, tree(0.0)["params"]))
print("READER:", reader.steps(), reader.stored(20)["params"], float(reader.restore(abstract, "params", 20)["w"][0, 0]))
reader.close()
print("PHASE trainer", file=sys.stderr, flush=True)
ck = checkpoint.Checkpointer(work, with_data=False, max_to_keep=5)
abstract = checkpoint.abstract_with_shardings(tree(0.0), jax.tree.map(lambda x: x.sharding, tree(0.0)))
state, step, moved = ck.restore_newest_intact(abstract, None, fallback=False, is_finite=guard.tree_is_finite)
print("RESUMED:", step, moved, float(state["params"]["w"][0, 0]))
ck.close()
"""


def test_a_garbage_step_metadata_file_is_one_warning_not_orbax_errors(tmp_path):
  """A step's _CHECKPOINT_METADATA (Orbax's timestamps and handler names, no weights) overwritten with garbage: Orbax
  logs an absl ERROR with the file's content each time it reads it (listing the steps, reading their metadata) and
  then does without it. Each reader says so in one warning line of ours instead, and the step still restores."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run(
      [sys.executable, "-c", _GARBAGE_STEP_METADATA, str(tmp_path)],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines() == ["READER: [10, 20] {'w': (8, 8)} 2.0", "RESUMED: 20 [] 2.0"], out.stdout
  stderr = out.stderr.split("PHASE reader\n", 1)[1]
  assert "ERROR" not in stderr and "Failed to json parse" not in stderr and "file content" not in stderr, stderr
  metadata = tmp_path / "checkpoints" / "20" / "_CHECKPOINT_METADATA"
  want = (
      f"warning: checkpoint 20 in {tmp_path / 'checkpoints'}: Orbax's step metadata file {metadata} is not readable "
      "JSON (damaged); it holds no weights, so the step is read from its items without it"
  )
  reader, trainer = stderr.split("PHASE trainer\n")
  assert reader.splitlines() == [want] and trainer.splitlines() == [want], stderr


def test_only_what_abandoned_reads_report_is_dropped(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append((u.exc_type, str(u.exc_value))))
  orphaned_reads.install()
  closed = asyncio.new_event_loop()
  closed.close()

  class Reports:

    def __init__(self, fail):
      self.fail = fail

    def __del__(self):
      self.fail()

  def raise_it(e):
    raise e

  Reports(lambda: closed.call_soon_threadsafe(print))  # a read completing onto the loop a failed restore closed
  assert seen == []
  Reports(lambda: raise_it(ValueError("mine")))  # anything else reaches the hook that was there before
  Reports(lambda: raise_it(RuntimeError("Event loop is closed")))  # the same words, raised elsewhere
  assert seen == [(ValueError, "mine"), (RuntimeError, "Event loop is closed")]


# ---- a rerun with a changed config -------------------------------------------------------------------------------


def test_resume_check_names_only_the_fields_that_fix_the_train_state():
  from helpers import tiny_config
  from iomm_jax.train import resume_check

  saved = tiny_config("pretrain,short")
  # What a resume may change: the schedule, the length, budgets, intervals, EMA's rate, the compute dtype, remat.
  free = tiny_config("pretrain,short", train__lr=1e-4, train__num_steps=99, train__time_budget_s=60.0)
  free.train.log_every, free.train.ckpt_every, free.train.eval_every, free.train.ema_decay = 1, 3, 7, 0.5
  free.model.dtype, free.data.num_images = "bfloat16", 17
  free.model.dit.arch.remat, free.model.dit.arch.scan_layers = "full", True
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
  # data.seed only orders the data, unless it also draws the held-out records.
  assert resume_check.changed_fields(saved, tiny_config("pretrain,short", data__seed=5)) == []
  held = tiny_config("pretrain,short", data__val_fraction=0.1)
  assert resume_check.changed_fields(held, tiny_config("pretrain,short", data__val_fraction=0.1, data__seed=5)) == [
      ("data.seed", 0, 5)
  ]
  assert resume_check.changed_fields(held, tiny_config("pretrain,short", data__val_fraction=0.2)) == [
      ("data.val_fraction", 0.1, 0.2)
  ]
  assert resume_check.changed_fields(saved, held) == [("data.val_fraction", 0.0, 0.1)]
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
  # The next stage in this workdir would resume at its step and train nothing: it goes to a new one, from these weights.
  with pytest.raises(
      ConfigError, match=r"holds a 'pretrain' run's .* train\.stage='finetune'.* --config\.init\.workdir="
  ):
    loop.train(tiny_config("finetune,short"), str(work))
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


def test_a_failed_save_is_worded_by_its_cause(tmp_path):
  """A full disk says how much space the save needs; another failure (a permission, an I/O error) says its cause and
  not to free space, which would not help."""
  ck = checkpoint.Checkpointer(str(tmp_path), with_data=False)
  ck.save(10, _tree(1.0))
  ck.check_save(wait=True)
  full = RuntimeError("RESOURCE_EXHAUSTED: Error writing local file: [os_error_code='28']")  # as TensorStore says it
  msg = ck._save_failure(20, full, _tree(2.0))
  assert "needs about" in msg and "Free space or move --workdir" in msg and "checkpoint 10 is intact" in msg
  denied = PermissionError(13, "Permission denied", str(tmp_path / "checkpoints" / "20"))
  msg = ck._save_failure(20, denied, _tree(2.0))
  assert "failed (" in msg and "Permission denied" in msg and "Fix that, then rerun to resume" in msg
  assert "Free space" not in msg and "checkpoint 10 is intact" in msg
  ck.close()
