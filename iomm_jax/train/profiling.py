"""Step profiling and the persistent compilation cache: the two start-up/run-time speed hooks of the trainer.

Profile: `--config.train.profile_steps=FIRST,COUNT` traces steps FIRST … FIRST+COUNT−1 with `jax.profiler` into
`<workdir>/profile/` (TensorBoard's profile plugin or https://ui.perfetto.dev read it; README "Speed: attention paths, FLOPs, profiles, compile cache"); with
several processes each traces into `<workdir>/profile/process_<k>/` (`profile_dir`).
`op_time_summary(dir, steps)` reads a trace back: XLA op time per step by op kind (where the step's time went).
Compile cache: `train.compile_cache_dir` keeps XLA's compiled programs on disk, so a restart or requeue of the same
config skips compilation ('' = `<workdir's parent>/xla_cache`, shared by every run beside it; 'off' = none).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re

import jax

from iomm_jax import workdir_layout


def compile_cache_dir(setting: str, workdir: str) -> str | None:
  """The cache folder a run uses: the setting, or the default beside the workdir; None when 'off'."""
  if setting == "off":
    return None
  if setting:
    return os.path.abspath(os.path.expanduser(setting))
  parent = os.path.dirname(os.path.abspath(workdir.rstrip("/"))) if workdir else os.path.expanduser("~/.cache/iomm_jax")
  return os.path.join(parent, workdir_layout.COMPILE_CACHE)


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


def profile_dir(workdir: str, process_index: int, process_count: int) -> str:
  """Where a process writes its traces and op_summary.json: `<workdir>/profile`, or `.../profile/process_<k>` when
  several processes share the workdir. jax.profiler names a trace after the host, so processes on one host would
  overwrite each other's traces in a shared folder, and every op_summary.json would be one process's view."""
  base = workdir_layout.path(workdir, workdir_layout.PROFILE)
  return base if process_count <= 1 else os.path.join(base, f"process_{process_index}")


class StepProfiler:
  """Traces steps [first, first + count) into `out_dir`; count 0 = off. Call `before(step)` and `after(step, x)`."""

  def __init__(self, first: int, count: int, out_dir: str):
    self.first, self.last, self.dir = int(first), int(first) + int(count), out_dir
    self.active = False

  def before(self, step: int, pending=None) -> None:
    """`step`: the number of updates done before this one; `pending`: what the previous step returned, waited for
    before the trace starts, so the trace holds exactly the traced steps (dispatch is asynchronous)."""
    if not self.active and self.first <= step < self.last:
      jax.block_until_ready(pending)
      os.makedirs(self.dir, exist_ok=True)
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """`step`: updates done after this one; `outputs` is waited for so the trace holds the whole step."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      self.write_summary(self.last - self.first)

  def write_summary(self, steps: int) -> None:
    """`<dir>/op_summary.json`: op_time_summary of the trace just written (a failure to read it only warns)."""
    try:
      summary = op_time_summary(self.dir, steps)
    except (OSError, ValueError) as e:
      print(f"profile: trace written to {self.dir}, but its op summary could not be read ({e})", flush=True)
      return
    with open(os.path.join(self.dir, "op_summary.json"), "w") as f:
      json.dump(summary, f, indent=1)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _op_kind(hlo_op: str) -> str:
  """'copy_bitcast_fusion.75' → 'copy_bitcast_fusion': XLA numbers each instance of an op kind."""
  return re.sub(r"\.\d+$", "", hlo_op)


def op_time_summary(trace_dir: str, steps: int, top: int = 12) -> dict:
  """Where the traced steps' time went: XLA op time per step, by op kind, from the newest trace in `trace_dir`.

  Reads the `*.xplane.pb` that `jax.profiler` wrote (a StepProfiler's folder) and sums every event that names the
  HLO op it ran (`hlo_op`), grouped by kind (`fusion.12` and `fusion.40` are both `fusion`). Device planes
  (`/device:GPU:0`, TPU) are used when they hold ops, averaged over devices; on CPU the host plane holds them (its
  XLA worker threads). Op times on different threads can overlap, so `op_s_per_step` may exceed the step's wall time.
  Returns {'plane', 'devices', 'op_s_per_step', 'ops': [{'kind', 's_per_step', 'per_step', 'share'}, …]} with the
  `top` kinds by time, largest first.
  """
  if steps < 1:
    raise ValueError(f"steps={steps}: the number of traced steps must be at least 1")
  files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb")))
  if not files:
    raise FileNotFoundError(f"no jax.profiler trace (plugins/profile/*/*.xplane.pb) under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(files[-1])
  per_plane: dict[str, dict[str, list[float]]] = {}
  for plane in data.planes:
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for line in plane.lines:
      for event in line.events:
        op = dict(event.stats).get("hlo_op")
        if op:
          entry = totals[_op_kind(str(op))]
          entry[0] += event.duration_ns * 1e-9
          entry[1] += 1
    if totals:
      per_plane[plane.name] = totals
  if not per_plane:
    raise ValueError(f"the trace {files[-1]} holds no XLA op events (was a jitted step run while tracing?)")
  planes = [n for n in per_plane if n.startswith("/device:")] or sorted(per_plane)
  merged: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for name in planes:
    for kind, (secs, count) in per_plane[name].items():
      merged[kind][0] += secs
      merged[kind][1] += count
  scale = 1.0 / (steps * len(planes))
  total = sum(secs for secs, _ in merged.values()) * scale
  ranked = sorted(merged.items(), key=lambda kv: -kv[1][0])[:top]
  return {
      "plane": planes[0] if len(planes) == 1 else f"{len(planes)} device planes",
      "devices": len(planes),
      "op_s_per_step": round(total, 6),
      "ops": [
          {
              "kind": kind,
              "s_per_step": round(secs * scale, 6),
              "per_step": round(count * scale, 2),
              "share": round(secs * scale / total, 4) if total else 0.0,
          }
          for kind, (secs, count) in ranked
      ],
  }
