"""Orbax checkpoints of (train state, Grain iterator state, resolved config); the only file that touches Orbax.

A checkpoint at step N holds the state after N updates and the data iterator positioned after the N-th
batch, so resuming continues at update N + 1 exactly. Saves are async and atomic (Orbax writes to a temporary
directory and renames), so an interrupted save never leaves a checkpoint that restore would read.
"""

from __future__ import annotations

import os
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
    if self.with_data and data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
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
