"""Orbax checkpoints of (train state, Grain iterator state, resolved config); the only file that touches Orbax.

A checkpoint at step N holds the state after N updates and the data iterator positioned after the N-th
batch, so resuming continues at update N + 1 exactly. Saves are async and atomic (Orbax writes to a temporary
directory and renames), so an interrupted save never leaves a checkpoint that restore would read.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """CheckpointManager over `<workdir>/checkpoints` with items 'state', 'data' and 'config'."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True, with_data: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.with_data = with_data
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    if with_data:
      handlers["data"] = grain.checkpoint.CheckpointHandler()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None, config: dict | None = None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config or {})}
    if self.with_data:
      if data_iter is None:
        raise ValueError("this checkpointer saves the data iterator; pass data_iter")
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iter=None, step: int | None = None) -> tuple[Any, int]:
    """Restore into `abstract_state` (ShapeDtypeStructs carrying the *target* shardings) and the iterator in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    data_dir = os.path.join(self.directory, str(step), "data")
    resharded = False
    if self.with_data and data_iter is not None:
      mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
      resharded = os.path.isdir(data_dir) and not os.path.exists(os.path.join(data_dir, mine))
      if not resharded:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if resharded:
      data_iter.set_state(iterator_state_from_other_process_count(data_dir, jax.process_count()))
    return restored["state"], step

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree, shardings) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed on `shardings` (same structure)."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def iterator_state_from_other_process_count(data_dir: str, new_count: int) -> dict:
  """The data-iterator state for `new_count` processes from one written by another process count.

  Each process reads a contiguous block of every global batch (data/pipeline.py ProcessBlocks) and Grain's
  position counts *batches*, so after N steps every process, whatever the count, is at position N: the state of
  process 0 is valid for all processes of the new layout.
  """
  names = [n for n in os.listdir(data_dir) if re.fullmatch(r"process_\d+-of-\d+\.json", n)]
  if not names:
    raise FileNotFoundError(f"{data_dir} holds no data-iterator state")
  old_count = int(re.fullmatch(r"process_\d+-of-(\d+)\.json", names[0]).group(1))
  with open(os.path.join(data_dir, f"process_0-of-{old_count}.json")) as f:
    state = json.load(f)
  if set(state) != {"next_index"}:
    raise ValueError(f"cannot move the data iterator state in {data_dir} from {old_count} to {new_count} processes: "
                     f"it is not a plain batch position ({sorted(state)}); resume with {old_count} processes or "
                     "config.data.num_workers=0")
  return {"next_index": int(state["next_index"])}
