"""Non-finite guard: a diverged step stops the run by name, and a non-finite state is never saved or resumed."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(RuntimeError):
  """The loss or gradient norm became NaN/Inf (config.train.on_nonfinite='stop'); the message names the step."""


def first_nonfinite(rows: list[dict], first_step: int) -> tuple[int, float, float] | None:
  """(step, loss, grad_norm) of the first row whose loss or grad norm is not finite; rows[i] is step first_step + i.

  A step counts as the update it produced, so rows[0] is update number first_step (1-based: state.step after it).
  """
  for i, row in enumerate(rows):
    loss, gnorm = float(row["loss"]), float(row["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
      return first_step + i, loss, gnorm
  return None


def check_rows(rows: list[dict], first_step: int, last_saved: int | None) -> None:
  """Raise NonFiniteError (one line: step, values, last saved checkpoint, what to do) if any row is not finite."""
  bad = first_nonfinite(rows, first_step)
  if bad is None:
    return
  step, loss, gnorm = bad
  saved = f"the last checkpoint (step {last_saved}) is finite" if last_saved is not None else "nothing was saved"
  raise NonFiniteError(
      f"non-finite training at step {step}: loss={loss} grad_norm={gnorm}; stopped without saving it ({saved}). "
      "Lower config.train.lr or raise config.train.warmup_steps and rerun to resume, or set "
      "config.train.on_nonfinite=skip to skip such updates"
  )


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def tree_is_finite(tree) -> bool:
  """True when every floating-point array of `tree` is finite (one reduction on device, one scalar to host)."""
  return bool(np.asarray(jax.device_get(_all_finite(tree))))
