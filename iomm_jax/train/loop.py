"""The training loop: data → jitted step → metrics / checkpoints / sample grids, resumable at any checkpoint."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from iomm_jax import metrics as metrics_lib
from iomm_jax import parallel
from iomm_jax.data import pipeline
from iomm_jax.train import builder, checkpoint, flops as flops_lib, profiling
from iomm_jax.train.checkpoint import abstract_with_shardings


def check_workdir(workdir: str) -> None:
  """Create the workdir or fail clearly when it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise SystemExit(f"--workdir={workdir!r} is not writable ({e.strerror}); choose a directory you can write to") from e


def save_resolved_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def make_data_iter(run, workdir: str):
  parallel.batch_size_per_process(run.config.train.global_batch, run.mesh)  # validates; the pipeline slices itself
  ds = pipeline.make_dataset(run.config.data, global_batch=run.config.train.global_batch,
                             process_index=jax.process_index(), process_count=jax.process_count(), workdir=workdir,
                             tokenize=run.tokenize)
  it = iter(ds)
  if run.config.data.cached:
    check_cached_shapes(run, ds)
  return it


def check_cached_shapes(run, ds) -> None:
  """A cache built for another resolution or model fails here, naming the cache, not deep inside jit."""
  first = next(iter(ds))
  want = {"latent": tuple(run.latent_shape),
          "vit_tokens": (run.mcfg.num_image_tokens, run.mcfg.text.hidden_size)}
  for key, shape in want.items():
    got = tuple(first[key].shape[1:])
    if got != shape:
      raise SystemExit(f"config.data.cache_path={run.config.data.cache_path!r}: cached {key} has shape {got} but "
                       f"this run needs {shape}; rebuild the cache with python -m iomm_jax.cache for this config")


def model_batch(batch: dict, cached: bool) -> dict:
  """The arrays the step consumes (drops ids and other host-only fields)."""
  keys = ["caption_ids", "caption_len", "is_image_only", "skipped", "skipped_uncaptioned"]
  keys += ["latent", "vit_tokens"] if cached else ["pixels", "vit_pixels"]
  return {k: batch[k] for k in keys if k in batch}


class SampleGrids:
  """Training-time grids: held-out shapes images, their self-conditioned samples, and text-prompt samples."""

  def __init__(self, run, workdir: str):
    from iomm_jax.data.sources import heldout_shapes
    self.run, self.dir = run, os.path.join(workdir, "samples")
    c = run.config
    n = c.sample.num
    # Held-out: another draw of the world, so these images were never trained on.
    self.ref, self.vit = heldout_shapes(c.data, n)

  def __call__(self, step: int, params, writer) -> str:
    from iomm_jax import sample as sample_lib
    c = self.run.config
    rng = jax.random.key(c.seed + 17)
    recon = sample_lib.generate(self.run, params, vit_pixels=self.vit, rng=rng)
    rows = [self.ref, sample_lib.to_uint8(recon)]
    for i, prompt in enumerate(c.sample.prompts):
      rows.append(sample_lib.to_uint8(sample_lib.generate(self.run, params, prompts=[prompt] * c.sample.num,
                                                          rng=jax.random.fold_in(rng, i + 1))))
    image = sample_lib.grid(rows)
    path = os.path.join(self.dir, f"step_{step:07d}.png")
    if jax.process_index() == 0:
      sample_lib.save_png(path, image, upscale=max(1, 96 // c.data.resolution))
      writer.image(step, "samples", image)
    return path


def train(config, workdir: str, *, max_steps: int | None = None) -> dict:
  """Train (or resume) in `workdir`; stops at config.train.num_steps, or after `max_steps` updates in this call."""
  check_workdir(workdir)
  save_resolved_config(config, workdir)
  profiling.enable_compile_cache(config.train.compile_cache_dir, workdir)
  run = builder.build(config)
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  data_iter = make_data_iter(run, workdir)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state, start = ckpt.restore(abstract_with_shardings(run.abstract_state, run.state_shardings), data_iter)
    dropped = writer.truncate_after(start)
    if is_main:
      print(f"resumed from {ckpt.directory} at step {start} (dropped {dropped} metrics rows logged after it)",
            flush=True)
  else:
    state, start = run.init_state(), 0
  previous = metrics_lib.read_metrics(workdir) if is_main else []
  # Skip counts are carried across resumes.
  skipped_total = int(previous[-1].get("skipped_total", 0)) if previous else 0
  uncaptioned_total = int(previous[-1].get("skipped_uncaptioned_total", 0)) if previous else 0
  t = config.train
  end = t.num_steps if max_steps is None else min(t.num_steps, start + max_steps)
  grids = SampleGrids(run, workdir) if (t.sample_every and config.data.source == "shapes") else None
  flops = flops_lib.flops_per_step(run)
  profiler = profiling.StepProfiler(*config.train.profile_steps, os.path.join(workdir, "profile"))
  tokens_per_image = (run.latent_shape[0] // 2) * (run.latent_shape[1] // 2)
  step_fn = run.train_step
  timer = metrics_lib.Throughput()
  window, last = [], {}
  bar = tqdm(total=end, initial=start, desc="train", disable=not is_main, dynamic_ncols=True, mininterval=5.0)
  step = start
  while step < end:
    t0 = time.perf_counter()
    local = next(data_iter)
    timer.add_wait(time.perf_counter() - t0)
    batch = parallel.global_batch(model_batch(local, bool(config.data.cached)), run.mesh)
    profiler.before(step)
    state, m = step_fn(state, run.frozen, batch)
    step += 1
    profiler.after(step, m)
    timer.steps += 1
    window.append(m)
    bar.update(1)
    if step % t.log_every == 0 or step == end:
      host = jax.device_get(window)
      skipped_total += int(sum(x.get("skipped", 0) for x in host))
      uncaptioned_total += int(sum(x.get("skipped_uncaptioned", 0) for x in host))
      last = {k: float(np.mean([x[k] for x in host])) for k in ("loss", "grad_norm", "kept_fraction")}
      last["lr"] = float(host[-1]["lr"])
      last["skipped_total"] = skipped_total
      last["skipped_uncaptioned_total"] = uncaptioned_total
      last.update(timer.summary(t.global_batch, jax.device_count(), tokens_per_image, flops, t.peak_flops))
      writer.scalars(step, last)
      bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.1f}")
      window, _ = [], timer.reset()
    if step % t.ckpt_every == 0 or step == end:
      ckpt.save(step, state, data_iter, json.loads(config.to_json_best_effort()), force=step == end)
    if grids is not None and (step % t.sample_every == 0 or step == end):
      params = state.ema_params if (config.sample.use_ema and state.ema_params) else state.params
      grids(step, params, writer)
      timer.reset()
  bar.close()
  profiler.close()
  ckpt.close()
  writer.close()
  return {"step": step, "start_step": start, **last}
