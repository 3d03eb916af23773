"""Benchmark one training step: compile time, median step time, images/s, tokens/s/device, MFU, parameter counts.

  python bench/step.py --config=configs/tiny.py [--config.train.global_batch=16] [--steps=20] [--warmup=3]

Prints ONE JSON line. Uses one real batch from the configured pipeline, repeated (data time is bench/data.py's job).
With --synthetic the batch is random arrays of the right shapes (no data source needed: full-size configs on GPU).
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps (after warm-up)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after compilation")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "random batch of the right shapes instead of the pipeline")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", False, "also time the same MM-DiT step in PyTorch (diffusers)")


def synthetic_batch(run, per_process: int):
  import numpy as np
  c = run.config
  rng = np.random.default_rng(0)
  b = {"caption_ids": np.zeros((per_process, c.data.max_text_tokens), np.int32),
       "caption_len": np.full((per_process,), 4, np.int32),
       "is_image_only": np.ones((per_process,), bool)}
  if c.data.cached:
    b["latent"] = rng.standard_normal((per_process,) + tuple(run.latent_shape), np.float32)
    b["vit_tokens"] = rng.standard_normal((per_process, run.mcfg.num_image_tokens, run.mcfg.text.hidden_size),
                                          np.float32)
  else:
    r, v = c.data.resolution, c.data.vit_size
    b["pixels"] = rng.uniform(-1, 1, (per_process, r, r, 3)).astype(np.float32)
    b["vit_pixels"] = rng.standard_normal((per_process, v, v, 3)).astype(np.float32)
  return b


def main(argv):
  del argv
  import jax
  from iomm_jax import parallel
  from iomm_jax.config import validate
  from iomm_jax.train import builder, loop
  config = _CONFIG.value
  validate(config)
  run = builder.build(config)
  per_process = parallel.batch_size_per_process(config.train.global_batch, run.mesh)
  if _SYNTHETIC.value:
    local = synthetic_batch(run, per_process)
  else:
    import tempfile
    local = loop.model_batch(next(loop.make_data_iter(run, tempfile.mkdtemp())), bool(config.data.cached))
  batch = parallel.global_batch(local, run.mesh)
  state = run.init_state()
  t0 = time.perf_counter()
  compiled = run.train_step.lower(state, run.frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(_WARMUP.value):
    state, m = compiled(state, run.frozen, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = compiled(state, run.frozen, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  n_dev = jax.device_count()
  tokens = (run.latent_shape[0] // 2) * (run.latent_shape[1] // 2)
  flops = loop.flops_per_step(run)
  out = {
      "config": config.model.dit.kind, "devices": n_dev, "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind, "mesh": dict(run.mesh.shape),
      "global_batch": config.train.global_batch, "resolution": config.data.resolution,
      "compile_s": round(compile_s, 2), "step_s_median": round(step_s, 4),
      "step_s_min": round(min(times), 4), "step_s_max": round(max(times), 4),
      "images_per_s": round(config.train.global_batch / step_s, 2),
      "tokens_per_s_per_device": round(config.train.global_batch * tokens / step_s / n_dev, 1),
      "flops_per_step": flops, "mfu": round(flops / step_s / (config.train.peak_flops * n_dev), 4),
      "params": run.param_counts, "loss": float(m["loss"]),
  }
  if _COMPARE_TORCH.value:
    from bench import torch_step
    out.update(torch_step.compare(config, step_s, steps=_STEPS.value))
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
