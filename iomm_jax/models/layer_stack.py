"""Running a list of identical blocks: unrolled, or as one `lax.scan`; each block optionally rematerialised.

`run_blocks(blocks, carry, *consts, call=…, remat=…, scan=…)` threads `carry` through every block:
``carry = call(block, carry, *consts)``.

- unrolled (scan=False): XLA sees every block separately — fastest to run, but compile time grows with depth.
- scan=True: the blocks' weights are stacked on a leading axis at call time and a single traced block is run under
  `jax.lax.scan`, so the step compiles one block instead of N (IOMM-XL: 30 DiT blocks, 28 LLM layers). The
  parameters stay stored per block (`layers.0.…`, `layers.1.…`), exactly as the PyTorch checkpoints name them, so
  conversion, checkpoints and sharding rules are the same in both modes. The price is one stacked copy of the blocks'
  weights inside the step (sharded like the weights, so 1/fsdp of them per device); `--dry_run` reports it.

Unrolled on a CPU, each block's input passes through `gradient_fence`: XLA:CPU otherwise fuses the residual
stream's gradient, a chain of cheap adds through every later block, into each of its consumers and recomputes it
there, work that grows with the square of the depth (23% of the mid-size DiT's gradient on one core).

Remat wraps the per-block function in `jax.checkpoint` over a pure function of the block's state, so weights are
inputs rather than saved residuals and only the policy's residuals survive to the backward pass.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def _default_call(block, carry, *consts):
  return block(carry, *consts)


def check_remat(remat: str, where: str) -> None:
  """Raise a ValueError naming `where` when `remat` is not a known policy."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"{where}={remat!r}; choose one of {sorted(REMAT_POLICIES)}")


def run_blocks(
    blocks: Sequence[nnx.Module],
    carry: Any,
    *consts: Any,
    call: Callable[..., Any] = _default_call,
    remat: str = "none",
    scan: bool = False,
) -> Any:
  """Apply `carry = call(block, carry, *consts)` for every block in order and return the final carry.

  `call` must be a plain function (it is traced once per block unrolled, or once in total with scan); `consts`
  are the same for every block (masks, RoPE tables, the timestep embedding).
  """
  check_remat(remat, "remat")
  if not scan:
    for block in blocks:
      graphdef, state = nnx.split(block)
      carry = _block_fn(graphdef, call, remat)(state, gradient_fence(carry), *consts)
    return carry
  if not blocks:
    return carry

  graphdef, first = nnx.split(blocks[0])
  states = [first]
  for i, block in enumerate(blocks[1:], start=1):
    gd, state = nnx.split(block)
    if gd != graphdef:
      raise ValueError(
          f"scan over layers needs identical blocks, but block {i} differs from block 0 in "
          "structure; set scan_layers=False for this model"
      )
    states.append(state)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  fn = _block_fn(graphdef, call, remat)

  def body(carry, state):
    return fn(state, carry, *consts), None

  carry, _ = jax.lax.scan(body, carry, stacked)
  return carry


def _block_fn(graphdef, call, remat: str):
  """(state, carry, *consts) → carry for blocks of this graphdef, wrapped in jax.checkpoint unless remat='none'."""

  def pure(state, carry, *consts):
    return call(nnx.merge(graphdef, state), carry, *consts)

  return pure if remat == "none" else jax.checkpoint(pure, policy=REMAT_POLICIES[remat])


@jax.custom_vjp
def gradient_fence(tree: Any) -> Any:
  """The identity; on CPU its gradient is materialised once instead of being fused into (and recomputed by) every
  consumer. Elsewhere it compiles to nothing.

  XLA removes optimisation barriers on CPU before fusing, so the fence is a conditional that XLA cannot see
  through: its predicate is a bit drawn by `rng_bit_generator` from a constant key, which XLA does not fold and
  which needs no communication between devices (a predicate read from the gradient itself would add a collective
  per block when the batch is sharded). The draw is never 0 (`tests/test_layer_stack.py` checks it), so the
  gradient passes through unchanged; the other branch (NaN) only makes the two branches differ, which keeps XLA
  from folding the conditional away.
  """
  return tree


def _fence_fwd(tree):
  return tree, None


def _fence_cotangent(g):
  if not jnp.issubdtype(g.dtype, jnp.floating):
    return g

  def cpu(g):
    _, bit = jax.lax.rng_bit_generator(jnp.zeros((4,), jnp.uint32), (), dtype=jnp.uint32)
    return jax.lax.cond(bit == 0, lambda g: jnp.full_like(g, jnp.nan), lambda g: g, g)

  return jax.lax.platform_dependent(g, cpu=cpu, default=lambda g: g)


def _fence_bwd(_, g):
  return (jax.tree.map(_fence_cotangent, g),)


gradient_fence.defvjp(_fence_fwd, _fence_bwd)
