"""Read only the generator's weights from a training checkpoint: its raw ``params`` or its ``ema_params``, never
the optimizer state, step or data position.

What a stage-2 warm start (`train/warm_start`) and the inference apps (`train/restore`) need. Reading the one
subtree (Orbax's partial restore) means the optimizer state is not read (for Adam, twice the weights' bytes), and
what is not read cannot stand in the way: stage 2 may use another optimizer, turn EMA on or off, or add or drop
REPA's head, and `sample` loads a run whatever its optimizer was.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from iomm_jax import workdir_layout
from iomm_jax import orphaned_reads, restore_failure
from iomm_jax import orbax_logs
from iomm_jax.train import checkpoint

WEIGHTS = ("params", "ema_params")  # the TrainState fields that hold generator weights


class DamagedCheckpointError(ValueError):
  """A checkpoint's metadata or weights could not be read (a truncated or missing file): the message names the step,
  the item and file, and the innermost cause; the caller adds what the user can do."""


class WeightsReader:
  """Read-only view of `<workdir>/checkpoints`: which weights each step holds, and a restore of one set of them."""

  def __init__(self, workdir: str):
    self.directory = os.path.abspath(workdir_layout.path(workdir, workdir_layout.CHECKPOINTS))
    # The state was saved by StandardCheckpointHandler, whose format is PyTreeCheckpointHandler's; only the latter
    # restores a subtree. No temporary folders are cleaned: the trainer may be writing beside this reader.
    self.notes = orbax_logs.StepMetadataNotes(self.directory)
    with self.notes.reading():  # lists the steps: reads each one's _CHECKPOINT_METADATA
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False),
          item_handlers={checkpoint.STATE: ocp.PyTreeCheckpointHandler()},
      )
    orbax_logs.quiet()  # "found 'config' … could not be restored" (not asked for); a damaged checkpoint: one message

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def stored(self, step: int) -> dict[str, dict[str, tuple]]:
    """{'params': {dotted path: shape}, 'ema_params': {...}} as the checkpoint's metadata says (no array read);
    'ema_params' is empty for a run trained without EMA. Raises DamagedCheckpointError."""
    where = os.path.join(self.directory, str(step), checkpoint.STATE)
    try:
      with self.notes.reading():
        tree = self.manager.item_metadata(step)[checkpoint.STATE]
      cause = None if tree is not None else "no metadata"
    except Exception as e:  # noqa: BLE001 — any failure to read the metadata is a damaged checkpoint
      cause = restore_failure.root_message(e)
      del e  # its traceback holds Orbax's read coroutines: not kept alive in the error we raise
    if cause:
      raise DamagedCheckpointError(
          f"checkpoint {step} in {self.directory} could not be restored: item '{checkpoint.STATE}' (its metadata, "
          f"under {where}) — {cause}."
      )
    out = {name: {} for name in WEIGHTS}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      head = checkpoint.dotted(path[:1])
      if head in out:
        out[head][checkpoint.dotted(path[1:])] = tuple(getattr(leaf, "shape", None) or ())
    return out

  @staticmethod
  def mismatch(abstract_params, stored: dict[str, tuple], ignore: tuple[str, ...] = ()) -> str | None:
    """The first parameter where `stored` (one entry of `stored(step)`: {dotted path: shape}) and `abstract_params`
    differ (another shape, or present in only one), or None when they agree; stored subtrees named in `ignore` may be
    absent from `abstract_params`."""
    ours = {checkpoint.dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    return checkpoint.first_difference(stored, ours, ignore)

  def restore(self, abstract_params, which: str, step: int):
    """The stored `which` weights ('params' or 'ema_params') onto `abstract_params`' shapes, dtypes and shardings
    (ShapeDtypeStructs carrying a sharding); the rest of the train state is not read. Check `mismatch` first (another
    model's checkpoint is not damaged); a file that cannot be read raises DamagedCheckpointError, after which the
    caller should `abandon` this reader (a failed Orbax read leaves reads in flight that print tracebacks at exit)."""
    if which not in WEIGHTS:
      raise ValueError(f"which={which!r}: one of {WEIGHTS}")
    item = {which: abstract_params}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    try:
      with self.notes.reading():
        return self.manager.restore(step, args=ocp.args.Composite(**{checkpoint.STATE: args}))[checkpoint.STATE][which]
    except Exception as e:  # noqa: BLE001 — any failure to read the stored arrays is a damaged checkpoint
      problem = restore_failure.describe(self.directory, step, e)
      del e
    raise DamagedCheckpointError(problem)

  def close(self) -> None:
    self.manager.close()

  def abandon(self) -> None:
    """Close after a failure without raising again (the caller is already stopping with its own message)."""
    try:
      self.manager.close()
    except Exception:  # noqa: BLE001
      pass
    orphaned_reads.collect()
