"""Memory and cost of the training step before running it: compile for the configured mesh with abstract arrays.

  python -m iomm_jax.main --config=configs/iomm_b.py --dry_run [--config.mesh.fsdp=8 ...]

Nothing the size of the model is allocated: the train state, the frozen weights and the batch are
`jax.ShapeDtypeStruct`s carrying their target shardings, and `run.train_step.lower(...).compile()` runs XLA's
partitioner and memory analysis on them. To size a GPU mesh on a CPU machine, simulate the devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=16 JAX_PLATFORMS=cpu \
    python -m iomm_jax.main --config=configs/iomm_xl.py --dry_run --config.mesh.fsdp=16

Caveat: the memory analysis is that of the compiling backend. On CPU, XLA fuses and schedules differently from
GPU (and may keep bf16 matmul temporaries in fp32), and attention runs unfused on CPU whatever model.attention
says (no cuDNN there), so `temp_bytes` is an estimate of the GPU figure; the parameter / optimizer / frozen byte
counts are exact (they come from the shardings).
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from iomm_jax import parallel
from iomm_jax.models import factory
from iomm_jax.train import builder, flops as flops_lib
from iomm_jax.train.checkpoint import abstract_with_shardings

GB = 1e9


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes that one device holds for a tree of ShapeDtypeStructs under the matching tree of shardings
  (the largest shard, so uneven or replicated layouts are counted fully)."""
  total = 0
  leaves = jax.tree_util.tree_leaves(abstract_tree)
  shards = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if len(leaves) != len(shards):
    raise ValueError(f"{len(leaves)} arrays but {len(shards)} shardings: the trees do not match")
  for x, s in zip(leaves, shards):
    shape = s.shard_shape(tuple(x.shape)) if x.shape else ()
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return int(total)


def abstract_frozen(run: builder.Run) -> dict:
  """ShapeDtypeStructs of the frozen MLLM / autoencoder weights with their shardings (nothing allocated)."""
  config = run.config
  mllm = jax.eval_shape(
      lambda: nnx.to_pure_dict(nnx.state(factory.make_mllm(config, nnx.Rngs(0), run.mcfg), nnx.Param))
  )
  ae = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(factory.make_ae(config, nnx.Rngs(0)), nnx.Param)))
  return abstract_with_shardings({"mllm": mllm, "ae": ae}, run.frozen_shardings)


def abstract_batch(run: builder.Run) -> dict:
  """ShapeDtypeStructs of one global model batch (what loop.model_batch feeds the step), batch-sharded."""
  c = run.config
  b = c.train.global_batch
  shapes: dict[str, tuple[tuple, Any]] = {
      "caption_ids": ((b, c.data.max_text_tokens), np.int32),
      "caption_len": ((b,), np.int32),
      "is_image_only": ((b,), np.bool_),
      "skipped": ((b,), np.int32),
  }
  if c.data.cached:
    shapes["latent"] = ((b,) + tuple(run.latent_shape), np.float32)
    shapes["vit_tokens"] = ((b, run.mcfg.num_image_tokens, run.mcfg.text.hidden_size), np.float32)
  else:
    r, v = c.data.resolution, c.data.vit_size
    shapes["pixels"] = ((b, r, r, 3), np.float32)
    shapes["vit_pixels"] = ((b, v, v, 3), np.float32)
  return {
      k: jax.ShapeDtypeStruct(s, d, sharding=parallel.batch_sharding(run.mesh, len(s))) for k, (s, d) in shapes.items()
  }


def xla_memory(compiled) -> dict:
  """XLA's memory analysis of a compiled program, per device: {'xla_gb': {argument, output, alias, temp,
  generated_code}, 'peak_gb_estimate': argument + output − alias + temp + generated code}; {} where the backend
  gives none. Used by the dry run and by bench/step.py (beside the measured peak)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  xla = {
      "argument": mem.argument_size_in_bytes,
      "output": mem.output_size_in_bytes,
      "alias": mem.alias_size_in_bytes,
      "temp": mem.temp_size_in_bytes,
      "generated_code": mem.generated_code_size_in_bytes,
  }
  peak = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"] + xla["generated_code"]
  return {"xla_gb": {k: round(v / GB, 3) for k, v in xla.items()}, "peak_gb_estimate": round(peak / GB, 3)}


def peak_device_memory_gb() -> float | None:
  """The largest `peak_bytes_in_use` of this process's devices (GPU/TPU) in GB; None where the backend keeps no
  memory statistics (CPU)."""
  peaks = []
  for d in jax.local_devices():
    stats = d.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return round(max(peaks) / GB, 3) if peaks else None


def report(config, *, mesh=None, compile_step: bool = True) -> dict:
  """Compile the step for the configured mesh (abstract arrays only) and report per-device memory and FLOPs.

  Keys: devices (the mesh size it assumes), mesh, platform, params (counts), per_device_gb (params, optimizer,
  ema, frozen, batch: exact, from the shardings), xla_gb (argument, output, alias, temp, generated code: from
  XLA's memory analysis), peak_gb_estimate (argument + output − alias + temp), flops_per_step (analytic model
  FLOPs, train/flops.py), flops (its per-component breakdown and remat recompute), flops_per_step_per_device,
  xla_flops_per_device (XLA's cost_analysis of the compiled step: every op, and per device), compile_s.
  """
  t0 = time.perf_counter()
  run = builder.build(config, mesh=mesh, load_frozen=False)
  state_abs = abstract_with_shardings(run.abstract_state, run.state_shardings)
  frozen_abs = abstract_frozen(run)
  batch_abs = abstract_batch(run)
  n = run.mesh.size
  sh = run.state_shardings
  per_dev = {
      "params": per_device_bytes(state_abs.params, sh.params),
      "optimizer": per_device_bytes(state_abs.opt_state, sh.opt_state),
      "ema": per_device_bytes(state_abs.ema_params, sh.ema_params) if state_abs.ema_params else 0,
      "frozen_mllm": per_device_bytes(frozen_abs["mllm"], run.frozen_shardings["mllm"]),
      "frozen_ae": per_device_bytes(frozen_abs["ae"], run.frozen_shardings["ae"]),
      "batch": per_device_bytes(batch_abs, {k: v.sharding for k, v in batch_abs.items()}),
  }
  counted = flops_lib.step_flops(run)
  flops = counted["model"]
  out = {
      "devices": n,
      "mesh": {k: int(v) for k, v in run.mesh.shape.items()},
      "platform": jax.devices()[0].platform,
      "global_batch": int(config.train.global_batch),
      "per_device_batch": config.train.global_batch / (run.mesh.shape["data"] * run.mesh.shape["fsdp"]),
      "params": dict(run.param_counts),
      "per_device_gb": {k: round(v / GB, 3) for k, v in per_dev.items()},
      "state_and_frozen_gb": round(sum(per_dev.values()) / GB, 3),
      "flops_per_step": flops,
      "flops_per_step_per_device": flops / n,
      "flops": {
          "per_image": counted["per_image"],
          "remat_per_step": counted["remat"],
          "hardware_per_step": counted["hardware"],
      },
  }
  if compile_step:
    lowered = run.train_step.lower(state_abs, frozen_abs, batch_abs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    out["compile_s"] = round(time.perf_counter() - t1, 1)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
      out["xla_flops_per_device"] = float(cost["flops"])
      if config.model.dit.arch.get("scan_layers") or config.model.mllm.scan_layers:
        # XLA's cost analysis does not know a while loop's trip count: a scanned stack's body counts once.
        out["xla_flops_note"] = (
            "scanned block stacks (scan_layers) are counted once by XLA's cost analysis, not once per block: "
            "compare flops_per_step_per_device with an unrolled dry run"
        )
    out.update(xla_memory(compiled))
  out["total_s"] = round(time.perf_counter() - t0, 1)
  return out
