"""The training loop: data → jitted step → metrics / checkpoints / validation / sample grids, resumable at any
checkpoint."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from iomm_jax import config as config_lib
from iomm_jax import metrics as metrics_lib
from iomm_jax import parallel
from iomm_jax.data import cache_reader, holdout, pipeline
from iomm_jax.weights import init_weights
from iomm_jax.train import builder, checkpoint, guard, preemption, profiling, resume_check, sample_grids
from iomm_jax.train import schedule, time_budget, validation
from iomm_jax.train import flops as flops_lib
from iomm_jax.train import lock as lock_lib
from iomm_jax.train import step as step_lib
from iomm_jax.train.checkpoint import abstract_with_shardings
from iomm_jax import output_folder, workdir_layout


def check_workdir(workdir: str) -> None:
  """Create the workdir or fail clearly when it cannot be written, or when it holds a config.json that is not a
  run's (a model folder such as the MLLM's: the run would overwrite it) or that is not JSON (cut short), a file
  where the run writes a folder, or a metrics.jsonl row that does not parse."""
  saved = workdir_layout.path(workdir, workdir_layout.CONFIG)
  if os.path.exists(saved) and not os.path.isfile(saved):
    raise SystemExit(
        f"--workdir={workdir!r}: {saved} is not a file (the run writes its config there); remove it, or give the "
        "run another folder"
    )
  if os.path.isfile(saved):
    try:
      is_run = workdir_layout.is_run_config(workdir_layout.read_config_json(workdir))
    except workdir_layout.SavedConfigError as e:
      raise SystemExit(f"error: {e}") from None
    if not is_run:
      raise SystemExit(
          f"--workdir={workdir!r} holds a config.json that is not a training run's (a model folder?); training "
          "there would overwrite it: give the run a folder of its own"
      )
  problem = output_folder.path_problem(workdir, folder=True)  # a file, or a path under one: not a permissions matter
  if problem:
    raise SystemExit(f"--workdir={workdir!r}: {problem}")
  for name in (workdir_layout.CHECKPOINTS, workdir_layout.SAMPLES):  # found at the first save, after the training
    inner = workdir_layout.path(workdir, name)
    if os.path.exists(inner) and not os.path.isdir(inner):
      raise SystemExit(f"--workdir={workdir!r}: {inner} is not a folder (the run writes its {name} there); move it")
  try:  # a hand-edited row stops the run now, not after the model is built and restored
    metrics_lib.read_metrics(workdir)
  except metrics_lib.MetricsFileError as e:
    raise SystemExit(f"error: {e}") from None
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise SystemExit(
        f"--workdir={workdir!r} is not writable ({e.strerror}); choose a directory you can write to"
    ) from e


def save_resolved_config(config, workdir: str) -> None:
  """`<workdir>/config.json`: the run's config, its local paths absolute (what sample and the evaluators load)."""
  if jax.process_index() == 0:  # written whole, then renamed: a crash never leaves a half file for the next start
    with output_folder.atomic_file(workdir_layout.path(workdir, workdir_layout.CONFIG), sole_writer=True) as tmp:
      tmp.write_text(config_lib.with_absolute_paths(config).to_json_best_effort(indent=2, sort_keys=True))


def make_data_iter(run, workdir: str):
  """(this process's batch iterator, the number of examples in the dataset — the captioned set for 'mix')."""
  parallel.batch_size_per_process(run.config.train.global_batch, run.mesh)  # validates; the pipeline slices itself
  source = holdout.train_source(run.config.data, workdir)  # without the held-out records
  ds = pipeline.make_dataset(
      run.config.data,
      global_batch=run.config.train.global_batch,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      workdir=workdir,
      tokenize=run.tokenize,
      source=source,
  )
  it = iter(ds)
  if run.config.data.cached:
    check_cached_shapes(run, ds)
  return it, len(source)


def check_cached_shapes(run, ds) -> None:
  """A cache built for another resolution or model fails here, naming the cache, not deep inside jit (or, where the
  shapes agree, not at all: features of another frozen MLLM would train without a word)."""
  d = run.config.data
  for field, path in (("data.cache_path", d.cache_path), ("data.image_cache_path", d.image_cache_path)):
    mismatches = cache_reader.cache_mismatches(run.config, path) if path else []
    if mismatches:
      raise SystemExit(
          f"config.{field}={path!r} holds features computed with other settings ({'; '.join(mismatches)}); "
          "rebuild the cache with python -m iomm_jax.cache for this config, or train with the settings it was "
          "made with"
      )
  first = next(iter(ds))
  want = {"latent": tuple(run.latent_shape), "vit_tokens": (run.mcfg.num_image_tokens, run.mcfg.text.hidden_size)}
  for key, shape in want.items():
    got = tuple(first[key].shape[1:])
    if got != shape:
      raise SystemExit(
          f"config.data.cache_path={run.config.data.cache_path!r}: cached {key} has shape {got} but "
          f"this run needs {shape}; rebuild the cache with python -m iomm_jax.cache for this config"
      )


def model_batch(batch: dict, cached: bool) -> dict:
  """The arrays the step consumes (drops ids and other host-only fields)."""
  keys = ["caption_ids", "caption_len", "is_image_only", *step_lib.BATCH_COUNTS]
  keys += pipeline.IMAGE_KEYS[bool(cached)]
  return {k: batch[k] for k in keys if k in batch}


def sampling_params(config, state):
  """The weights that grids and validation use: EMA when sample.use_ema and the run keeps one."""
  return state.ema_params if (config.sample.use_ema and state.ema_params) else state.params


def _validation(config, workdir: str, run, is_main: bool):
  """(Validator or None, SampleGrids or None) for this run; the held-out examples are read once, here."""
  t = config.train
  if not (t.eval_every or t.sample_every):
    return None, None
  held = validation.HeldOut(run, workdir)
  validator = None
  if t.eval_every and len(held):
    validator = validation.Validator(run, held)
  elif t.eval_every and is_main:
    print(
        f"note: no held-out set for config.data.source={config.data.source!r}, so no validation loss; set "
        "config.data.val_fraction (e.g. 0.01) or config.data.val_path, or config.train.eval_every=0",
        flush=True,
    )
  grids = sample_grids.SampleGrids(run, workdir, held.examples) if t.sample_every else None
  return validator, grids


def train(config, workdir: str, *, max_steps: int | None = None) -> dict:
  """Train (or resume) in `workdir`; stops after config.train.num_steps (or train.epochs over the dataset), after
  `max_steps` updates in this call, or at the first step that ends after config.train.time_budget_s seconds (the
  summary's "stopped_by" says which).

  Holds the workdir lock (process 0) for the whole call; raises preemption.Preempted after saving when SIGTERM,
  SIGUSR1 or Ctrl-C (SIGINT) arrived, guard.NonFiniteError on divergence (nothing saved),
  checkpoint.SaveFailedError when a save failed.
  """
  check_workdir(workdir)
  resume_check.check(config, workdir)  # a changed model shape stops here, before anything is written or moved
  is_main = jax.process_index() == 0
  lock = lock_lib.WorkdirLock(workdir, enabled=is_main).acquire()
  if lock.took_over:
    print(lock.took_over, flush=True)
  watch = preemption.PreemptionWatch().install()
  ckpt = writer = data_iter = None
  try:
    profiling.enable_compile_cache(config.train.compile_cache_dir, workdir)
    run = builder.build(config, load_frozen=False)
    # Everything that reads the user's data, and the checkpoints' fit, is checked before the first write: a config
    # that cannot run (a wrong data.path or data.val_path, another model's checkpoints) leaves the workdir as it was.
    # The cheap checks come before loading the frozen weights (gigabytes for a real MLLM).
    data_iter, dataset_size = make_data_iter(run, workdir)
    num_steps = schedule.num_steps(config.train, dataset_size)
    run = run.with_num_steps(num_steps)
    held_out = _validation(config, workdir, run, is_main)  # reads the held-out set now, not at the first eval
    init_weights.check(config, run.abstract_state.params)  # converted start weights that do not fit: stop here
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints, cleanup_tmp=True)
    ckpt.check_fits(run.abstract_state)  # another config's checkpoints are not damaged: stop, move nothing
    run.frozen = builder.load_frozen_weights(config, run)
    save_resolved_config(config, workdir)  # once the run builds and its data reads
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    if config.train.epochs > 0 and is_main:
      print(
          f"train.epochs={config.train.epochs} over {dataset_size} examples at batch {config.train.global_batch}: "
          f"{num_steps} steps",
          flush=True,
      )
    summary = _train(config, workdir, run, writer, data_iter, ckpt, watch, max_steps, num_steps, held_out)
    ckpt.close()
    return summary
  except BaseException:
    if ckpt is not None:
      ckpt.abandon()
    raise
  finally:
    # Each step runs even when one before it fails: the lock must not outlive the run.
    try:
      if data_iter is not None:  # stops Grain's worker processes and frees their shared memory, on every way out
        data_iter.close()
    finally:
      try:
        if writer is not None:
          writer.close()
      finally:
        try:
          watch.uninstall()
        finally:
          lock.release()


def _train(config, workdir, run, writer, data_iter, ckpt, watch, max_steps, num_steps: int, held_out) -> dict:
  is_main = jax.process_index() == 0
  t = config.train
  if ckpt.latest_step() is not None:
    log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    state, start, _ = ckpt.restore_newest_intact(
        abstract_with_shardings(run.abstract_state, run.state_shardings),
        data_iter,
        fallback=bool(t.restore_fallback),
        is_finite=guard.tree_is_finite,
        log=log,
    )
    dropped = writer.truncate_after(start)
    log(f"resumed from {ckpt.directory} at step {start} (dropped {dropped} metrics rows logged after it)")
  else:
    state, start = run.init_state(), 0
    writer.truncate_after(0)  # rows of an earlier attempt that stopped before its first checkpoint (e.g. NaN)
  previous = [r for r in metrics_lib.read_metrics(workdir) if "loss" in r] if is_main else []
  # Skip counts are carried across resumes (from the last training row: a validation-only row has no totals).
  skipped_total = int(previous[-1].get("skipped_total", 0)) if previous else 0
  uncaptioned_total = int(previous[-1].get("skipped_uncaptioned_total", 0)) if previous else 0
  nonfinite_total = int(previous[-1].get("nonfinite_total", 0)) if previous else 0
  truncated_total = int(previous[-1].get("captions_truncated_total", 0)) if previous else 0
  end = num_steps if max_steps is None else min(num_steps, start + max_steps)
  if start >= num_steps and is_main:  # said, so a rerun that trains nothing is not mistaken for one that did
    print(
        f"the newest checkpoint (step {start}) is at or past the run's {num_steps} steps: nothing to train; "
        "raise --config.train.num_steps to train on",
        flush=True,
    )
  validator, grids = held_out
  flops = flops_lib.flops_per_step(run)
  profiler = profiling.StepProfiler(
      *config.train.profile_steps, profiling.profile_dir(workdir, jax.process_index(), jax.process_count())
  )
  tokens_per_image = flops_lib.image_tokens(run)
  step_fn = run.train_step
  timer = metrics_lib.Throughput()
  window, last = [], {}
  unchecked, unchecked_from = [], start + 1  # metrics not yet checked for NaN/Inf, and the step of the first
  last_saved = start if start else None
  bar = tqdm(total=end, initial=start, desc="train", disable=not is_main, dynamic_ncols=True, mininterval=5.0)

  def check_finite():
    nonlocal unchecked, unchecked_from
    if unchecked and t.on_nonfinite == "stop":
      guard.check_rows(jax.device_get(unchecked), unchecked_from, last_saved)
    unchecked, unchecked_from = [], step + 1

  def log_window(extra: dict | None = None):
    nonlocal window, last, skipped_total, uncaptioned_total, nonfinite_total, truncated_total
    host = jax.device_get(window)
    skipped_total += int(sum(x.get("skipped", 0) for x in host))
    uncaptioned_total += int(sum(x.get("skipped_uncaptioned", 0) for x in host))
    nonfinite_total += int(sum(x.get("nonfinite", 0) for x in host))
    newly_truncated = int(sum(x.get("caption_truncated", 0) for x in host))
    if newly_truncated and not truncated_total and is_main:
      print(
          f"warning: captions longer than config.data.max_text_tokens={config.data.max_text_tokens} template tokens "
          "are cut to fit (counted as captions_truncated_total in metrics); raise data.max_text_tokens to keep "
          "them whole",
          flush=True,
      )
    truncated_total += newly_truncated
    means = ("loss", "grad_norm", "kept_fraction") + (("repa",) if "repa" in host[0] else ())  # total loss incl. REPA
    last = {k: float(np.mean([x[k] for x in host])) for k in means}
    last["lr"] = float(host[-1]["lr"])
    last["steps_averaged"] = len(host)  # fewer than log_every on the first row after a resume or a preemption
    last["skipped_total"] = skipped_total
    last["skipped_uncaptioned_total"] = uncaptioned_total
    last["nonfinite_total"] = nonfinite_total
    last["captions_truncated_total"] = truncated_total
    last.update(timer.summary(t.global_batch, jax.device_count(), tokens_per_image, flops, t.peak_flops))
    writer.scalars(step, {**last, **(extra or {})})
    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.1f}")
    window, _ = [], timer.reset()

  def save(force: bool):
    nonlocal last_saved
    check_finite()
    if not guard.tree_is_finite(state):
      raise guard.NonFiniteError(
          f"non-finite values in the train state at step {step} (loss and grad norm were "
          f"finite); not saved. The last checkpoint is step {last_saved}"
      )
    ckpt.save(step, state, data_iter, json.loads(config.to_json_best_effort()), force=force)
    last_saved = step

  budget = time_budget.TimeBudget(t.time_budget_s, check_every=t.log_every)
  stopped_by = "num_steps" if end == num_steps else "max_steps"
  step = start
  while step < end:
    t0 = time.perf_counter()
    local = next(data_iter)
    timer.add_wait(time.perf_counter() - t0)
    batch = parallel.global_batch(model_batch(local, bool(config.data.cached)), run.mesh)
    profiler.before(step, state)
    state, m = step_fn(state, run.frozen, batch)
    step += 1
    profiler.after(step, m)
    timer.steps += 1
    window.append(m)
    unchecked.append(m)
    bar.update(1)
    if step < end and budget.spent(step):  # this step becomes the call's last: logged, drawn and saved as such
      end, stopped_by = step, "time_budget"
      if is_main:
        bar.write(
            f"config.train.time_budget_s={t.time_budget_s:g} spent ({budget.elapsed():.0f} s): stopping at step "
            f"{step} of {num_steps}; rerun the same command to train on from here"
        )
    ckpt.check_save()  # a failed async save stops the run here, not at the next save
    extra = {}  # validation and grid figures of this step: in its metrics row when it logs one, else their own
    evaluate = validator is not None and step % t.eval_every == 0
    draw = grids is not None and (step % t.sample_every == 0 or step == end)
    if evaluate or draw:  # finish the dispatched steps first, so that their time is not counted as validation's
      jax.block_until_ready(state.params)
    if evaluate:
      extra.update(validator(sampling_params(config, state)))
      if is_main:
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in extra.items()))
    if draw:
      grids(step, sampling_params(config, state), writer)
      extra["grid_seconds"] = grids.seconds
    timer.exclude(extra.get("val_seconds", 0.0) + extra.get("grid_seconds", 0.0))
    if step % t.log_every == 0 or step == end:
      check_finite()
      log_window(extra)
    elif extra:
      writer.scalars(step, extra)
    if step % t.ckpt_every == 0 or step == end:
      save(force=step == end)
    if watch.requested():
      check_finite()
      if window:
        log_window()
      if last_saved != step:
        save(force=True)
      ckpt.check_save(wait=True)
      bar.close()
      raise preemption.Preempted(step, watch.received)
  bar.close()
  profiler.close()
  return {"step": step, "start_step": start, "stopped_by": stopped_by, **last}
