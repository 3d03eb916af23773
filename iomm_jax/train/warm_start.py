"""Start a run's generator from another training workdir (stage 2 from stage 1), with no detour through PyTorch
files: `--config.init.workdir=DIR [--config.init.use_ema=False]`.

The source checkpoint is restored straight onto this run's shardings; only its generator weights (EMA or raw) are
kept: the optimizer state, step and data position start fresh.
"""

from __future__ import annotations

from iomm_jax.train import checkpoint
from iomm_jax import workdir_layout


class WarmStartError(ValueError):
  """config.init.workdir does not fit the run; the message names the field and the fix."""


def _same(src: dict, config, dotted: str):
  node_src, node_run = src, config
  for part in dotted.split("."):
    node_src, node_run = node_src.get(part, {}) if isinstance(node_src, dict) else None, node_run[part]
  return node_src, node_run


def params_from_workdir(config, abstract_state, state_shardings):
  """The generator params of config.init.workdir's latest checkpoint, on this run's shardings."""
  workdir = config.init.workdir
  try:
    src = workdir_layout.read_config_json(workdir)
  except workdir_layout.SavedConfigError as e:
    raise WarmStartError(f"config.init.workdir={workdir!r}: {e}") from None
  if not isinstance(src, dict):
    raise WarmStartError(f"config.init.workdir={workdir!r}: its config.json is not a run's config (a JSON object)")
  # The checkpoint is restored into this run's TrainState layout, so the parts that shape it must agree.
  for field in ("train.optimizer", "model.dit.kind"):
    theirs, ours = _same(src, config, field)
    if theirs != ours:
      raise WarmStartError(
          f"config.init.workdir={workdir!r} was trained with {field}={theirs!r} but this run has "
          f"{field}={ours!r}; set config.{field}={theirs!r} or start from another workdir"
      )
  src_ema = float(src.get("train", {}).get("ema_decay", 0.0)) > 0
  if src_ema != (config.train.ema_decay > 0):
    raise WarmStartError(
        f"config.init.workdir={workdir!r} {'has' if src_ema else 'has no'} EMA weights but this run "
        f"has config.train.ema_decay={config.train.ema_decay}; make both use EMA or neither"
    )
  src_repa = float(src.get("train", {}).get("repa_weight", 0.0)) > 0
  if src_repa != (config.train.repa_weight > 0):
    raise WarmStartError(
        f"config.init.workdir={workdir!r} was trained {'with' if src_repa else 'without'} REPA's head but this run "
        f"has config.train.repa_weight={config.train.repa_weight}; use REPA in both stages or in neither"
    )
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
