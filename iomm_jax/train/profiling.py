"""Step profiling and the persistent compilation cache: the two start-up/run-time speed hooks of the trainer.

Profile: `--config.train.profile_steps=FIRST,COUNT` traces steps FIRST … FIRST+COUNT−1 with `jax.profiler` into
`<workdir>/profile/` (TensorBoard's profile plugin or https://ui.perfetto.dev read it; README "Performance").
Compile cache: `train.compile_cache_dir` keeps XLA's compiled programs on disk, so a restart or requeue of the same
config skips compilation ('' = `<workdir's parent>/xla_cache`, shared by every run beside it; 'off' = none).
"""

from __future__ import annotations

import os

import jax


def compile_cache_dir(setting: str, workdir: str) -> str | None:
  """The cache folder a run uses: the setting, or the default beside the workdir; None when 'off'."""
  if setting == "off":
    return None
  if setting:
    return os.path.abspath(os.path.expanduser(setting))
  parent = os.path.dirname(os.path.abspath(workdir.rstrip("/"))) if workdir else os.path.expanduser("~/.cache/iomm_jax")
  return os.path.join(parent, "xla_cache")


def enable_compile_cache(setting: str, workdir: str) -> str | None:
  """Point JAX's persistent compilation cache at the run's folder (before the first compilation).

  An explicit JAX_COMPILATION_CACHE_DIR in the environment wins (the tests share one cache that way).
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  path = compile_cache_dir(setting, workdir)
  if path is None:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every program that took over a second to compile (the train step takes tens of seconds to minutes).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


class StepProfiler:
  """Traces steps [first, first + count) into `out_dir`; count 0 = off. Call `before(step)` and `after(step, x)`."""

  def __init__(self, first: int, count: int, out_dir: str):
    self.first, self.last, self.dir = int(first), int(first) + int(count), out_dir
    self.active = False

  def before(self, step: int) -> None:
    """`step`: the number of updates done before this one."""
    if not self.active and self.first <= step < self.last:
      os.makedirs(self.dir, exist_ok=True)
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """`step`: updates done after this one; `outputs` is waited for so the trace holds the whole step."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
