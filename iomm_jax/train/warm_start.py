"""Start a run's generator from another training workdir (stage 2 from stage 1), with no detour through PyTorch
files: `--config.init.workdir=DIR [--config.init.use_ema=False]`.

The source checkpoint is restored straight onto this run's shardings; only its generator weights (EMA or raw) are
kept: the optimizer state, step and data position start fresh.
"""

from __future__ import annotations

from iomm_jax import config_validation
from iomm_jax.train import checkpoint


class WarmStartError(ValueError):
  """config.init.workdir does not fit the run; the message names the field and the fix."""


def params_from_workdir(config, abstract_state, state_shardings):
  """The generator params of config.init.workdir's latest checkpoint, on this run's shardings."""
  workdir = config.init.workdir
  # The checkpoint is restored into this run's TrainState layout, so the parts that shape it must agree.
  problem = config_validation.init_workdir_problem(config)
  if problem:
    raise WarmStartError(problem)
  ckpt = checkpoint.Checkpointer(workdir, with_data=False)
  try:
    if ckpt.latest_step() is None:
      raise WarmStartError(f"config.init.workdir={workdir!r} has no checkpoint yet; finish that run first")
    mismatch = ckpt.param_mismatch(abstract_state.params)
    if mismatch:
      raise WarmStartError(
          f"config.init.workdir={workdir!r}: its checkpoint does not fit this run's model ({mismatch}); the DiT, "
          "RQA and MLLM architectures (widths, depths) must be the same"
      )
    try:
      state, _ = ckpt.restore(checkpoint.abstract_with_shardings(abstract_state, state_shardings))
    except (ValueError, KeyError, TypeError) as e:
      raise WarmStartError(
          f"config.init.workdir={workdir!r}: its checkpoint does not fit this run's model "
          f"({str(e).splitlines()[0][:300]}); the DiT, RQA and MLLM architectures (widths, depths) must be the same"
      ) from None
  except BaseException:
    ckpt.abandon()  # a failed Orbax read leaves coroutines behind: closed quietly, or they print tracebacks at exit
    raise
  ckpt.close()
  return state.ema_params if config.init.use_ema and state.ema_params else state.params
