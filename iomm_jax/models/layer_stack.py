"""Running a list of identical blocks: unrolled, or as one `lax.scan`; each block optionally rematerialised.

`run_blocks(blocks, carry, *consts, call=…, remat=…, scan=…)` threads `carry` through every block:
``carry = call(block, carry, *consts)``.

- unrolled (scan=False): XLA sees every block separately — fastest to run, but compile time grows with depth.
- scan=True: the blocks' weights are stacked on a leading axis at call time and a single traced block is run under
  `jax.lax.scan`, so the step compiles one block instead of N (IOMM-XL: 30 DiT blocks, 28 LLM layers). The
  parameters stay stored per block (`layers.0.…`, `layers.1.…`), exactly as the PyTorch checkpoints name them, so
  conversion, checkpoints and sharding rules are the same in both modes. The price is one stacked copy of the blocks'
  weights inside the step (sharded like the weights, so 1/fsdp of them per device); `--dry_run` reports it.

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
      carry = _block_fn(graphdef, call, remat)(state, carry, *consts)
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
