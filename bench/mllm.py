"""Forward+backward time of the frozen LLM pass w.r.t. appended query embeddings (the RQA gradient path).

Prints ONE JSON line: per remat mode, the median step time over --runs after --warmup, the compiled program's
temporary memory (XLA memory analysis), and the device's peak bytes in use where `memory_stats()` reports it
(None on CPU; peak is process-wide, so modes run from the least to the most memory-hungry).

  python bench/mllm.py --layers 28 --hidden 1536 --heads 12 --kv_heads 2 --seq 530 --batch 8   # InternVL3-2B LLM
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench import _common  # noqa: E402
from iomm_jax import dtype_names  # noqa: E402
from iomm_jax.models.factory import DTYPES  # noqa: E402
from iomm_jax.models.layer_stack import REMAT_POLICIES  # noqa: E402
from iomm_jax.models.layers import ATTENTION_IMPLS  # noqa: E402
from iomm_jax.models.qwen2 import Qwen2Config, Qwen2Model  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=_common.count(), default=2)
  p.add_argument("--hidden", type=_common.count(), default=256)
  p.add_argument("--heads", type=_common.count(), default=4)
  p.add_argument("--kv_heads", type=_common.count(), default=2)
  p.add_argument(
      "--intermediate", type=_common.count(0), default=0, help="FFN width; 0 = round(5.833 * hidden) as Qwen2.5"
  )
  p.add_argument("--seq", type=_common.count(2), default=128, help="total sequence length (context + queries)")
  p.add_argument(
      "--queries", type=_common.count(0), default=0, help="appended trainable query tokens; 0 = min(256, seq // 2)"
  )
  p.add_argument("--batch", type=_common.count(), default=2)
  p.add_argument(
      "--dtype",
      type=dtype_names.argparse_type(tuple(DTYPES), "--dtype"),
      default="bfloat16",
      help="frozen weights + compute: bfloat16 or float32 (bf16, fp32)",
  )
  p.add_argument("--remat", default="full,none", help=f"comma-separated remat modes to time: {sorted(REMAT_POLICIES)}")
  p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS, help="attention implementation")
  p.add_argument("--no_mask", action="store_true", help="no padding mask (causal only)")
  p.add_argument("--warmup", type=_common.count(0), default=2)
  p.add_argument("--runs", type=_common.count(), default=5)
  args = p.parse_args(argv)
  unknown = [m for m in args.remat.split(",") if m not in REMAT_POLICIES]
  if unknown or not args.remat:
    p.error(f"argument --remat: give one or more of {sorted(REMAT_POLICIES)}, not {args.remat!r}")
  if args.heads % args.kv_heads:
    p.error(f"argument --heads: {args.heads} is not a multiple of --kv_heads={args.kv_heads}")
  if args.hidden % args.heads:
    p.error(f"argument --hidden: {args.hidden} is not a multiple of --heads={args.heads}")
  if args.queries >= args.seq:
    p.error(f"argument --queries: {args.queries} leaves no context in --seq={args.seq}; give fewer than --seq")
  return args


def _peak_bytes():
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # backends without memory stats
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def build(args):
  """Frozen weights (materialised on device inside one jit, no host copy), inputs, and the abstract model."""
  dtype = DTYPES[args.dtype]
  cfg = Qwen2Config(
      vocab_size=1024,
      hidden_size=args.hidden,
      num_hidden_layers=args.layers,
      num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads,
      intermediate_size=args.intermediate or int(round(args.hidden * 35 / 6)),
  )
  n_q = args.queries or min(256, args.seq // 2)

  def make():
    return Qwen2Model(cfg, attention_impl=args.attention, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))

  abstract = nnx.eval_shape(make)
  frozen = jax.jit(lambda: nnx.state(make()))()
  k1, k2 = jax.random.split(jax.random.key(0))
  context = jax.random.normal(k1, (args.batch, args.seq - n_q, args.hidden), dtype)
  queries = jax.random.normal(k2, (args.batch, n_q, args.hidden), jnp.float32)  # trainable, fp32
  return abstract, frozen, context, queries, dtype, n_q


def time_mode(args, built, remat: str) -> dict:
  abstract, frozen, context, queries, dtype, n_q = built
  abstract.remat = remat  # a static attribute: only the graphdef changes between modes
  graphdef = nnx.graphdef(abstract)
  mask = None if args.no_mask else jnp.ones((args.batch, args.seq), bool)

  def loss(q, frozen, context):
    h = nnx.merge(graphdef, frozen)(jnp.concatenate([context, q.astype(dtype)], axis=1), mask)
    return jnp.mean(jnp.square(h[:, -n_q:].astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss))
  t0 = time.perf_counter()
  compiled = step.lower(queries, frozen, context).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  for _ in range(args.warmup):
    jax.block_until_ready(compiled(queries, frozen, context))
  times = []
  for _ in range(args.runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(queries, frozen, context))
    times.append(time.perf_counter() - t0)
  tokens = args.batch * args.seq
  out = {
      "median_s": statistics.median(times),
      "min_s": min(times),
      "tokens_per_s": tokens / statistics.median(times),
      "compile_s": compile_s,
      "temp_bytes": temp,
      "peak_bytes": _peak_bytes(),
  }
  print(f"[bench/mllm] remat={remat}: {out}", file=sys.stderr, flush=True)  # progress, not the result line
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  built = build(args)
  results = {mode: time_mode(args, built, mode) for mode in args.remat.split(",")}
  print(
      json.dumps(
          {
              "bench": "mllm_llm_fwd_bwd",
              "device": str(jax.devices()[0].device_kind),
              "backend": jax.default_backend(),
              "layers": args.layers,
              "hidden": args.hidden,
              "heads": args.heads,
              "kv_heads": args.kv_heads,
              "intermediate": args.intermediate or int(round(args.hidden * 35 / 6)),
              "seq": args.seq,
              "queries": args.queries or min(256, args.seq // 2),
              "batch": args.batch,
              "dtype": args.dtype,
              "runs": args.runs,
              "results": results,
          }
      )
  )
  return 0


if __name__ == "__main__":
  sys.exit(_common.run(main))
