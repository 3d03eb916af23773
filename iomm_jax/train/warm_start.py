"""Start a run's generator from another training workdir (stage 2 from stage 1), with no detour through PyTorch
files: `--config.init.workdir=DIR [--config.init.use_ema=False]`.

Only the source's generator weights (EMA or raw) are read (`checkpoint_weights`); the optimizer state, step and
data position start fresh, so stage 2 may use another optimizer or EMA setting than stage 1. REPA's head, which
only the loss uses, is kept when both runs have one, dropped when this run has none, and starts fresh when only
this run has one. The DiT and the adapter must be the same architecture.
"""

from __future__ import annotations

import os
import sys

import jax

from iomm_jax import config_validation, workdir_layout
from iomm_jax.models.iomm import REPA_HEAD
from iomm_jax.train import checkpoint_weights


class WarmStartError(ValueError):
  """config.init.workdir does not fit the run; the message names the field and the fix."""


def params_from_workdir(config, fresh_params):
  """The generator params of config.init.workdir's latest checkpoint, placed as `fresh_params` (this run's freshly
  initialised, sharded params) are; a REPA head only this run has keeps its fresh weights."""
  workdir = config.init.workdir
  problem = config_validation.init_workdir_problem(config)
  if problem:
    raise WarmStartError(problem)
  reader = checkpoint_weights.WeightsReader(workdir)
  try:
    step = reader.latest_step()
    if step is None:
      raise WarmStartError(f"config.init.workdir={workdir!r} has no checkpoint yet; finish that run first")
    stored = reader.stored(step)
    which = "ema_params" if config.init.use_ema and stored["ema_params"] else "params"
    if config.init.use_ema and which == "params":
      print(
          f"note: config.init.workdir={workdir!r} was trained without EMA; starting from its raw weights",
          file=sys.stderr,
      )
    target = dict(fresh_params)
    head = target.pop(REPA_HEAD, None)
    stored_head = any(path.split(".")[0] == REPA_HEAD for path in stored[which])
    if head is not None and stored_head:
      target[REPA_HEAD] = head
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    mismatch = reader.mismatch(abstract, stored[which], ignore=(REPA_HEAD,))
    if mismatch:
      raise WarmStartError(
          f"config.init.workdir={workdir!r}: its checkpoint does not fit this run's model ({mismatch}); the DiT, "
          "RQA and MLLM architectures (widths, depths) must be the same"
      )
    params = reader.restore(abstract, which, step)
  except checkpoint_weights.DamagedCheckpointError as e:
    hint = _older_step_hint(reader, step)
    reader.abandon()
    raise WarmStartError(f"config.init.workdir={workdir!r}: {e} {hint}") from None
  except BaseException:
    reader.abandon()  # a failed Orbax read leaves coroutines behind: closed quietly, or they print tracebacks at exit
    raise
  reader.close()
  if head is not None and not stored_head:
    params[REPA_HEAD] = head  # REPA added in this stage: its head starts where a fresh run's would
  return params


def _older_step_hint(reader, damaged: int) -> str:
  """What a stage 2 whose source's newest checkpoint is damaged can do (it always starts from the newest)."""
  older = [s for s in reader.steps() if s < damaged]
  where = os.path.join(reader.directory, str(damaged))
  if not older:
    return f"That run has no other checkpoint: train it again, or repair or replace {where}"
  aside = workdir_layout.path(os.path.dirname(reader.directory), workdir_layout.DAMAGED_CHECKPOINTS)
  return f"To start from its next older checkpoint (step {older[-1]}), move {where} to {aside}/"
