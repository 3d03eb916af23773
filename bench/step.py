"""Benchmark one training step: compile time, median step time, images/s, tokens/s/device, MFU, parameter counts.

  python bench/step.py --config=configs/tiny.py [--config.train.global_batch=16] [--steps=20] [--warmup=3]
      [--profile=DIR] [--compare_torch]

Prints ONE JSON line. Uses one real batch from the configured pipeline, repeated (data time is bench/data.py's job).
With --synthetic the batch is random arrays of the right shapes (no data source needed: full-size configs on GPU).
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench import _common  # noqa: E402
from bench.gpu_sweep import PHASE_LOG  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps (after warm-up)", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after compilation", lower_bound=0)
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "random batch of the right shapes instead of the pipeline")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", False, "also time the same MM-DiT step in PyTorch (diffusers)")
_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "--compare_torch: alternating torch/JAX repeats (median of medians)", lower_bound=1
)
_DIT_ONLY = flags.DEFINE_bool(
    "dit_only", False, "--compare_torch: skip the full IOMM step (its compile), time " "only the DiT-only comparison"
)
_PROFILE = flags.DEFINE_string(
    "profile", "", "write a jax.profiler trace of 3 timed steps into this folder (and its op time summary)"
)
_CACHE = flags.DEFINE_string(
    "compile_cache",
    "",
    "persistent compilation cache folder for the cold/warm compile "
    "figures ('' = a fresh temporary folder, so the first compile is cold)",
)


def synthetic_batch(run, per_process: int):
  import numpy as np

  c = run.config
  rng = np.random.default_rng(0)
  b = {
      "caption_ids": np.zeros((per_process, c.data.max_text_tokens), np.int32),
      "caption_len": np.full((per_process,), 4, np.int32),
      "is_image_only": np.ones((per_process,), bool),
  }
  if c.data.cached:
    b["latent"] = rng.standard_normal((per_process,) + tuple(run.latent_shape), np.float32)
    b["vit_tokens"] = rng.standard_normal(
        (per_process, run.mcfg.num_image_tokens, run.mcfg.text.hidden_size), np.float32
    )
  else:
    r, v = c.data.resolution, c.data.vit_size
    b["pixels"] = rng.uniform(-1, 1, (per_process, r, r, 3)).astype(np.float32)
    b["vit_pixels"] = rng.standard_normal((per_process, v, v, 3)).astype(np.float32)
  return b


def main(argv):
  del argv
  if _DIT_ONLY.value and not _COMPARE_TORCH.value:
    raise SystemExit("--dit_only goes with --compare_torch")
  import tempfile

  import jax
  from iomm_jax import metrics as metrics_lib, parallel
  from iomm_jax.config_validation import validate
  from iomm_jax.train import builder, dry_run, flops as flops_lib, loop, profiling

  config = _CONFIG.value
  validate(config)
  if _DIT_ONLY.value:
    from bench import torch_step

    print(
        json.dumps(
            {
                "config": config.model.dit.kind,
                "global_batch": config.train.global_batch,
                **torch_step.compare(config, None, steps=_STEPS.value, repeats=_REPEATS.value),
            }
        )
    )
    return
  cache_dir = _CACHE.value or tempfile.mkdtemp(prefix="iomm_bench_xla_cache_")
  cache_dir = profiling.enable_compile_cache(cache_dir, "")
  phases = {}  # seconds per start-up phase; each is also logged as it ends, so a run killed mid-way says where

  def phase_done(name: str, since: float) -> None:
    phases[name] = round(time.perf_counter() - since, 2)
    print(f"{PHASE_LOG}{name} {phases[name]} s", file=sys.stderr, flush=True)

  t0 = time.perf_counter()
  run = builder.build(config, load_frozen=False)
  phase_done("build", t0)
  t0 = time.perf_counter()
  run.frozen = builder.load_frozen_weights(config, run)
  jax.block_until_ready(run.frozen)
  phase_done("frozen_weights", t0)
  per_process = parallel.batch_size_per_process(config.train.global_batch, run.mesh)
  if _SYNTHETIC.value:
    local = synthetic_batch(run, per_process)
  else:
    import tempfile

    local = loop.model_batch(next(loop.make_data_iter(run, tempfile.mkdtemp())[0]), bool(config.data.cached))
  batch = parallel.global_batch(local, run.mesh)
  t0 = time.perf_counter()
  state = run.init_state()
  jax.block_until_ready(state)
  phase_done("train_state", t0)
  # Cold: compiled and written to the persistent cache; warm: the same program again, read back from it (what a
  # restarted or requeued job pays).
  t0 = time.perf_counter()
  compiled = run.train_step.lower(state, run.frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  phase_done("compile", t0)
  t0 = time.perf_counter()
  compiled = run.train_step.lower(state, run.frozen, batch).compile()
  compile_warm_s = time.perf_counter() - t0
  for _ in range(_WARMUP.value):
    state, m = compiled(state, run.frozen, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = compiled(state, run.frozen, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  profile_ops = None
  if _PROFILE.value:
    prof = profiling.StepProfiler(0, 3, _PROFILE.value)
    for i in range(3):
      prof.before(i, state)
      state, m = compiled(state, run.frozen, batch)
      prof.after(i + 1, m)
    summary_path = os.path.join(_PROFILE.value, "op_summary.json")
    profile_ops = json.load(open(summary_path)) if os.path.exists(summary_path) else None
  n_dev = jax.device_count()
  tokens = flops_lib.image_tokens(run)
  counted = flops_lib.step_flops(run)
  flops = counted["model"]
  out = {
      "config": config.model.dit.kind,
      "devices": n_dev,
      "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "mesh": dict(run.mesh.shape),
      "global_batch": config.train.global_batch,
      "resolution": config.data.resolution,
      "startup_s": phases,  # build, frozen weights (random or read), train state: before the step compiles
      "compile_s": round(compile_s, 2),
      "compile_s_warm_cache": round(compile_warm_s, 2),
      "compile_cache": cache_dir,
      "step_s_median": round(step_s, 4),
      "step_s_min": round(min(times), 4),
      "step_s_max": round(max(times), 4),
      "images_per_s": round(config.train.global_batch / step_s, 2),
      "tokens_per_s_per_device": round(config.train.global_batch * tokens / step_s / n_dev, 1),
      "flops_per_step": flops,
      "flops_remat_per_step": counted["remat"],
      "mfu": round(metrics_lib.mfu(flops, step_s, config.train.peak_flops, n_dev), 4),
      "attention": config.model.attention,
      "dit_remat": config.model.dit.arch.get("remat", "none"),
      # Measured (GPU/TPU; None on CPU) beside XLA's estimate for the same program (the dry run's figure).
      "peak_memory_gb": dry_run.peak_device_memory_gb(),
      "memory_estimate_gb": dry_run.xla_memory(compiled).get("peak_gb_estimate"),
      "profile": _PROFILE.value or None,
      "profile_ops": profile_ops,
      "params": run.param_counts,
      "loss": float(m["loss"]),
  }
  if _COMPARE_TORCH.value:
    from bench import torch_step

    out.update(torch_step.compare(config, step_s, steps=_STEPS.value, repeats=_REPEATS.value))
  print(json.dumps(out))


if __name__ == "__main__":
  _common.absl_run(main, _CONFIG)
