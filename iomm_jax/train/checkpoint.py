"""Orbax checkpoints of (train state, Grain iterator state, resolved config): with `checkpoint_weights` (which
reads only the generator weights), the only code that touches a training run's checkpoints.

A checkpoint at step N holds the state after N updates and the data iterator positioned after the N-th
batch, so resuming continues at update N + 1 exactly. Saves are async and atomic (Orbax writes to a temporary
directory and renames), so an interrupted save never leaves a checkpoint that restore would read.

Faults: a failed async save surfaces at the first step boundary after it (`check_save`), as one line with the
path, the bytes needed and the bytes free; `restore_newest_intact` moves a damaged or non-finite newest checkpoint
to `<workdir>/damaged_checkpoints/` (outside Orbax's step listing) and resumes from the newest intact one. A
checkpoint whose stored tree does not match the run's (`state_mismatch`: another model or optimizer config wrote
it) is not damage: it stays where it is and the run stops with one line (`CheckpointMismatchError`).
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from iomm_jax import workdir_layout
from iomm_jax import orphaned_reads, restore_failure
from iomm_jax import orbax_logs, write_failures
from iomm_jax.train import iterator_state

DAMAGED_DIR = workdir_layout.DAMAGED_CHECKPOINTS
STATE, DATA, CONFIG = workdir_layout.STATE_ITEM, workdir_layout.DATA_ITEM, workdir_layout.CONFIG_ITEM


class CheckpointRestoreError(RuntimeError):
  """No checkpoint could be restored (or the newest failed and config.train.restore_fallback is off)."""


class CheckpointMismatchError(CheckpointRestoreError):
  """A checkpoint that holds a train state of another structure or shape than the run builds: written with another
  model or optimizer config, not damaged (nothing is moved aside)."""


class SaveFailedError(RuntimeError):
  """An (async) checkpoint save failed; the message names the path, the bytes needed and the bytes free."""


class Checkpointer:
  """CheckpointManager over `<workdir>/checkpoints` with items 'state', 'data' and 'config'."""

  def __init__(
      self,
      workdir: str,
      *,
      max_to_keep: int = 3,
      async_save: bool = True,
      with_data: bool = True,
      cleanup_tmp: bool = False,
  ):
    self.directory = os.path.abspath(workdir_layout.path(workdir, workdir_layout.CHECKPOINTS))
    self.with_data = with_data
    handlers = {STATE: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()}
    if with_data:
      handlers[DATA] = grain.checkpoint.CheckpointHandler()
    self.notes = orbax_logs.StepMetadataNotes(self.directory)
    with self.notes.reading():  # lists the steps: reads each one's _CHECKPOINT_METADATA
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=max_to_keep,
              create=True,
              enable_async_checkpointing=async_save,
              # the trainer (holding the workdir lock) removes leftovers of a
              # killed or failed save; readers (sample, export) must not
              cleanup_tmp_directories=cleanup_tmp,
          ),
          item_handlers=handlers,
      )
    self.pending: int | None = None  # step of the async save in flight (checked at every step boundary)
    orbax_logs.quiet()  # a damaged checkpoint or a failed save is one message, not thousands of lines of Orbax's

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None, config: dict | None = None, *, force: bool = False) -> bool:
    """Start an async save of `step` (the previous save must have succeeded: check_save raises otherwise)."""
    self.check_save(wait=True)
    self.warn_if_low_space(state)
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config or {})}
    if self.with_data:
      if data_iter is None:
        raise ValueError("this checkpointer saves the data iterator; pass data_iter")
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001 — a synchronous part of the save failed (e.g. no space for metadata)
      raise SaveFailedError(self._save_failure(step, e, state)) from None
    if started:
      self.pending = step
      self._pending_bytes = _tree_bytes(state)
    return started

  def check_save(self, *, wait: bool = False) -> None:
    """Raise SaveFailedError if the save in flight has failed; cheap when it is still running (unless `wait`)."""
    if self.pending is None:
      return
    if not wait and self.manager.is_saving_in_progress():
      return
    step, self.pending = self.pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 — Orbax re-raises the background thread's error here
      raise SaveFailedError(self._save_failure(step, e, None)) from None
    if step not in self.steps_on_disk():
      raise SaveFailedError(
          f"checkpoint save of step {step} to {self.directory} did not complete; " f"{_space(self.directory)}"
      )

  def _save_failure(self, step: int, exc: BaseException, state) -> str:
    need = self.last_size() or (_tree_bytes(state) if state is not None else getattr(self, "_pending_bytes", 0))
    free = shutil.disk_usage(self.directory).free
    cause = restore_failure.root_message(exc)
    previous = [s for s in self.steps_on_disk() if s != step]
    kept = f"checkpoint {max(previous)} is intact" if previous else "no earlier checkpoint exists"
    where = os.path.join(self.directory, str(step))
    # The errno of the innermost cause, whichever library reported it (Orbax's TensorStore words it in text).
    root = restore_failure.chain(exc)[-1]
    code = getattr(write_failures.as_oserror(root, where) or root, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free < need):
      return (
          f"checkpoint save of step {step} to {where} failed: needs about {need:,} bytes, {free:,} bytes free "
          f"({cause}); {kept}. Free space or move --workdir, then rerun to resume"
      )
    return f"checkpoint save of step {step} to {where} failed ({cause}); {kept}. Fix that, then rerun to resume"

  def steps_on_disk(self) -> list[int]:
    """Finished checkpoint steps in the directory (Orbax's own list may already name a save that failed)."""
    return workdir_layout.steps_in(self.directory)

  def last_size(self) -> int:
    """Bytes of the newest finished checkpoint on disk (0 when none)."""
    steps = self.steps_on_disk()
    step = steps[-1] if steps else None
    return _dir_bytes(os.path.join(self.directory, str(step))) if step is not None else 0

  def warn_if_low_space(self, state) -> None:
    need = self.last_size() or _tree_bytes(state)
    free = shutil.disk_usage(self.directory).free
    if free < need and jax.process_index() == 0:
      print(
          f"warning: {free:,} bytes free under {self.directory}, the last checkpoint took {need:,}; this save may "
          "fail",
          file=sys.stderr,
          flush=True,
      )

  def restore(self, abstract_state, data_iter=None, step: int | None = None) -> tuple[Any, int]:
    """Restore into `abstract_state` (ShapeDtypeStructs carrying the *target* shardings) and the iterator in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    data_dir = os.path.join(self.directory, str(step), DATA)
    resharded = False
    if self.with_data and data_iter is not None:
      mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
      resharded = os.path.isdir(data_dir) and not os.path.exists(os.path.join(data_dir, mine))
      if not resharded:
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    with self.notes.reading():
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if resharded:
      data_iter.set_state(iterator_state.from_other_process_count(data_dir, jax.process_count()))
    return restored[STATE], step

  def restore_newest_intact(self, abstract_state, data_iter, *, fallback: bool, is_finite, log=print):
    """(state, step, moved): restore the newest checkpoint that reads back and passes `is_finite(state)`.

    A failing one is described in one paragraph (step, item, file, cause); with `fallback` it is moved to
    <workdir>/damaged_checkpoints/<step> (kept, not deleted) and the next older one is tried. Without `fallback`
    the older ones are only read, to name the newest intact one in the CheckpointRestoreError.
    """
    moved, problems = [], []  # problems: (step, paragraph)
    for step in sorted(self.manager.all_steps(), reverse=True):
      self.check_fits(abstract_state, step)  # another config's checkpoint is not damaged: never moved aside
      try:
        state, _ = self.restore(abstract_state, data_iter, step)
        problem = (
            None
            if is_finite(state)
            else (
                f"checkpoint {step} in {self.directory} holds non-finite values (NaN/Inf) in its train state "
                "(item 'state'), saved before the non-finite guard existed or by a diverged run."
            )
        )
      except Exception as e:  # noqa: BLE001 — any failure to read a checkpoint is reported the same way
        problem = restore_failure.describe(self.directory, step, e)
        del e
        orphaned_reads.collect()
      if not _agree(problem is None):  # every process takes the same branch
        problem = problem or f"checkpoint {step} in {self.directory} failed to restore on another process."
        problems.append((step, problem))
        if fallback:
          dest = self.move_aside(step)
          moved.append(step)
          log(f"{problem} Moved it to {dest}; trying the next older checkpoint.")
        continue
      if problems and not fallback:
        raise CheckpointRestoreError(
            f"{problems[0][1]} The newest intact checkpoint is step {step}. To resume from it, rerun with "
            f"--config.train.restore_fallback=True (moves the damaged one to {self.damaged_dir()}/), or move "
            f"{os.path.join(self.directory, str(problems[0][0]))} away yourself"
        )
      return state, step, moved
    if not problems:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    where = (
        f" (all moved to {self.damaged_dir()}/; a rerun starts from step 0)"
        if fallback
        else "; move the checkpoints folder away to start from step 0"
    )
    raise CheckpointRestoreError(
        f"no checkpoint under {self.directory} could be restored{where}. Newest: " f"{problems[0][1]}"
    )

  def damaged_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)  # beside checkpoints/, in the workdir

  def move_aside(self, step: int) -> str:
    """Rename checkpoints/<step> to damaged_checkpoints/<step>[-<time>] (process 0), then reload the step list."""
    dest = os.path.join(self.damaged_dir(), str(step))
    if os.path.exists(dest):
      dest += time.strftime("-%Y%m%d-%H%M%S")
    if jax.process_index() == 0:
      os.makedirs(self.damaged_dir(), exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"iomm_move_aside_{step}")
    with self.notes.reading():
      self.manager.reload()
    return dest

  def state_mismatch(self, abstract_state, step: int) -> str | None:
    """The first leaf where the train state stored at `step` and `abstract_state` (the run's, arrays or
    ShapeDtypeStructs) differ — another shape, or present in only one — read from the checkpoint's metadata, no
    arrays read. None when they agree, or when the metadata cannot be read (damage, which the restore reports)."""
    try:
      with self.notes.reading():
        metadata = self.manager.item_metadata(step)
      tree = metadata[STATE] if metadata is not None else None
    except Exception:  # noqa: BLE001 — unreadable metadata is a damaged checkpoint, not another config's
      return None
    if tree is None:
      return None
    stored = {
        dotted(p): tuple(getattr(x, "shape", None) or ()) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    ours = {}
    for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
      # A typed PRNG key is stored as its raw key data (one more axis): only its presence is compared.
      is_key = hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      ours[dotted(p)] = None if is_key else tuple(getattr(x, "shape", ()))
    return first_difference(stored, ours)

  def check_fits(self, abstract_state, step: int | None = None) -> None:
    """Raise CheckpointMismatchError (one line) when checkpoint `step` (default the newest; none: nothing to check)
    holds a train state that `abstract_state` does not match."""
    step = self.latest_step() if step is None else step
    if step is None:
      return
    mismatch = self.state_mismatch(abstract_state, step)
    if mismatch:
      raise CheckpointMismatchError(
          f"checkpoint {step} in {self.directory} holds a train state this config does not build ({mismatch}): "
          "it was saved with another model or optimizer config, so it is not damaged and was left where it is. "
          f"Rerun with the config it was saved with ({workdir_layout.checkpoint_config_file(self.directory, step)}), "
          "or train this config in a new --workdir"
      )

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    with self.notes.reading():
      return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.check_save(wait=True)
    self.manager.close()

  def abandon(self) -> None:
    """Close after a failure without raising again (the run is already stopping with its own message)."""
    try:
      self.pending = None
      self.manager.close()
    except Exception:  # noqa: BLE001
      pass
    orphaned_reads.collect()


def first_difference(stored: dict, ours: dict, ignore: tuple[str, ...] = ()) -> str | None:
  """The first path where a checkpoint's tree and the run's ({dotted path: shape}; a None shape in `ours` compares
  presence only) differ, in words, or None when they agree. Stored subtrees named in `ignore` may be absent."""
  for path, shape in ours.items():
    if path not in stored:
      return f"{path}: in this run, not in the checkpoint"
    if shape is not None and stored[path] != shape:
      return f"{path}: stored {stored[path]}, this run {shape}"
  extra = sorted(p for p in set(stored) - set(ours) if p.split(".")[0] not in ignore)
  return f"{extra[0]}: in the checkpoint, not in this run" if extra else None


def dotted(path) -> str:
  """A jax key path as tree_paths' dotted string ('dit.blocks.0.kernel'), whatever the key types (dict keys,
  sequence indices, dataclass and namedtuple fields)."""
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _agree(ok: bool) -> bool:
  """True only when `ok` on every process (collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _tree_bytes(tree) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(tree)))


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(root, f))
      except OSError:
        pass
  return total


def _space(path: str) -> str:
  return f"{shutil.disk_usage(path).free:,} bytes free"


def abstract_with_shardings(tree, shardings) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed on `shardings` (same structure)."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
