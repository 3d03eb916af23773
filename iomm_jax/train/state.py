"""TrainState: everything that changes during training, as one pytree of pure dicts of arrays."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """step = number of updates applied; params/ema_params are pure dicts of the Generator (DiT + RQA)."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # {} when EMA is disabled
  rng: jax.Array  # base key; the step's key is fold_in(rng, step)


def create(params, optimizer, *, ema: bool, rng) -> TrainState:
  """A fresh state at step 0 (runs under jit so everything is born with the params' shardings)."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else {},
      rng=rng,
  )
