"""The accelerator figures in one call: bench/step.py over global batch, attention path and DiT remat policy.

  python bench/gpu_sweep.py --out=DIR [--config=configs/iomm_b.py] [--batches=8,16,32] [--attention=auto,xla,cudnn]
      [--remat=none,dots_saveable,full] [--base_batch=16] [--steps=10] [--budget_s=480] [--allow_cpu] [-- extra]

One factor at a time, most important first: every batch with the config's own attention and remat; then every other
attention path, then every other remat policy, at `--base_batch`. Each point is one `bench/step.py --synthetic` run
(random weights, cached-feature batch shapes, the mesh fully FSDP over this host's devices) in its own process, so an
out-of-memory point is recorded and the sweep goes on. No new point starts once `--budget_s` has passed (device time
is scarce). Writes `DIR/points.jsonl` (bench/step.py's line per point, or its error) and `DIR/table.md` (images/s,
MFU, step time, measured peak memory beside XLA's estimate, compile time); prints one JSON summary line.
`bench/gpu.sh` runs it after checking the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import _common  # noqa: E402

ROOT = _common.ROOT
HERE = os.path.dirname(os.path.abspath(__file__))
# bench/step.py writes one stderr line with this prefix as each start-up phase ends ("<prefix>build 1.2 s").
PHASE_LOG = "bench/step.py: "


def plan(batches, attentions, remats, base_batch, default_attention, default_remat) -> list[dict]:
  """The sweep's points, in order, without repeats: batches at the defaults, then attention, then remat."""
  points = [dict(batch=b, attention=default_attention, remat=default_remat) for b in batches]
  points += [dict(batch=base_batch, attention=a, remat=default_remat) for a in attentions]
  points += [dict(batch=base_batch, attention=default_attention, remat=r) for r in remats]
  unique = []
  for p in points:
    if p not in unique:
      unique.append(p)
  return unique


def step_command(config: str, point: dict, steps: int, extra: list[str], compile_cache: str) -> list[str]:
  """The bench/step.py command line of one point. All points share `compile_cache`: the programs they have in
  common (the random frozen weights, the generator's init) compile once; each point's train step differs, so its
  compile_s stays a cold figure."""
  return [
      sys.executable,
      os.path.join(HERE, "step.py"),
      f"--config={config}",
      "--synthetic",
      f"--steps={steps}",
      "--warmup=2",
      f"--compile_cache={compile_cache}",
      "--config.data.cached=True",
      "--config.data.cache_path=unused",
      f"--config.train.global_batch={point['batch']}",
      "--config.mesh.data=1",
      "--config.mesh.fsdp=-1",
      "--config.mesh.tensor=1",
      f"--config.model.attention={point['attention']}",
      f"--config.model.dit.arch.remat={point['remat']}",
      *extra,
  ]


def run_point(cmd: list[str], timeout_s: float) -> dict:
  """bench/step.py's JSON line, or {'error': its last output line} when it failed (e.g. out of memory)."""
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired as e:
    # bench/step.py logs each start-up phase as it ends: the last one says how far it got.
    err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    done = [l[len(PHASE_LOG) :] for l in err.splitlines() if l.startswith(PHASE_LOG)]
    return {"error": f"timed out after {timeout_s:.0f} s; " + (f"last done: {done[-1]}" if done else "no phase done")}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode == 0 and lines:
    return json.loads(lines[-1])
  tail = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
  oom = next((l for l in tail if "RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower()), None)
  return {"error": (oom or (tail[-1] if tail else f"exit {proc.returncode}"))[:300]}


def _fmt(x, spec: str) -> str:
  return "—" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
  """Markdown table of the sweep's points."""
  head = (
      "| batch | attention | DiT remat | images/s | MFU | step ms | peak GB (measured) | peak GB (XLA estimate) "
      "| compile s | device |\n|---|---|---|---|---|---|---|---|---|---|\n"
  )
  body = []
  for r in rows:
    p, m = r["point"], r["result"]
    if "error" in m:
      body.append(f"| {p['batch']} | {p['attention']} | {p['remat']} | failed: {m['error']} | | | | | | |")
      continue
    body.append(
        f"| {p['batch']} | {p['attention']} | {p['remat']} | {_fmt(m.get('images_per_s'), '.1f')} | "
        f"{_fmt(100 * m['mfu'] if m.get('mfu') is not None else None, '.1f')}% | "
        f"{_fmt(1000 * m['step_s_median'], '.1f')} | {_fmt(m.get('peak_memory_gb'), '.2f')} | "
        f"{_fmt(m.get('memory_estimate_gb'), '.2f')} | {_fmt(m.get('compile_s'), '.1f')} | "
        f"{m.get('device_kind', '?')} ×{m.get('devices', '?')} |"
    )
  return head + "\n".join(body) + "\n"


def _csv(text: str, cast=str) -> list:
  return [cast(x) for x in text.split(",") if x]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="folder for points.jsonl and table.md")
  ap.add_argument("--config", default="configs/iomm_b.py")
  ap.add_argument(
      "--batches", type=_common.counts(), default="8,16,32", help="global batches at the default attention and remat"
  )
  ap.add_argument("--attention", default="auto,xla,cudnn", help="attention paths at --base_batch ('splash' on TPU)")
  ap.add_argument("--remat", default="none,dots_saveable,full", help="DiT remat policies at --base_batch")
  ap.add_argument("--base_batch", type=_common.count(), default=16)
  ap.add_argument("--steps", type=_common.count(), default=10, help="timed steps per point")
  ap.add_argument(
      "--budget_s",
      type=float,
      default=480,
      help="start no new point after this many seconds (480: a 15-minute device lease keeps time to start and copy back)",
  )
  ap.add_argument("--point_timeout_s", type=float, default=420)
  ap.add_argument("--allow_cpu", action="store_true", help="run on CPU (a smoke test: the figures mean nothing)")
  args, extra = ap.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  config_file = os.path.join(ROOT, args.config.partition(":")[0])
  if not os.path.isfile(config_file):
    ap.error(f"argument --config: {config_file} is not a config file; give one such as configs/iomm_b.py")

  import jax

  platform = jax.devices()[0].platform
  if platform == "cpu" and not args.allow_cpu:
    print(f"gpu_sweep.py: JAX sees no accelerator (platform '{platform}'); use --allow_cpu for a smoke test")
    return 3
  cfg = _load_config(args.config)
  points = plan(
      args.batches,
      _csv(args.attention),
      _csv(args.remat),
      args.base_batch,
      cfg.model.attention,
      cfg.model.dit.arch.get("remat", "none"),
  )
  os.makedirs(args.out, exist_ok=True)
  t0, rows, skipped = time.time(), [], []
  with open(os.path.join(args.out, "points.jsonl"), "w") as f:
    for point in points:
      if time.time() - t0 > args.budget_s:
        skipped.append(point)
        continue
      command = step_command(args.config, point, args.steps, extra, os.path.join(args.out, "xla_cache"))
      result = run_point(command, args.point_timeout_s)
      rows.append({"point": point, "result": result})
      f.write(json.dumps({"point": point, **result}) + "\n")
      f.flush()
      progress = result.get("error") or f"{result['images_per_s']} images/s"
      print(f"gpu_sweep: {point} → {progress}", file=sys.stderr, flush=True)  # stdout: the one JSON line
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table(rows))
    if skipped:
      f.write(f"\nNot run (past --budget_s={args.budget_s:.0f}): {skipped}\n")
  ok = [r for r in rows if "error" not in r["result"]]
  best = max(ok, key=lambda r: r["result"]["images_per_s"], default=None)
  print(
      json.dumps(
          {
              "config": args.config,
              "platform": platform,
              "points": len(rows),
              "failed": len(rows) - len(ok),
              "skipped": len(skipped),
              "best": None if best is None else {**best["point"], "images_per_s": best["result"]["images_per_s"]},
              "seconds": round(time.time() - t0, 1),
              "table": os.path.join(args.out, "table.md"),
          }
      )
  )
  return 0 if ok else 1


def _load_config(path: str):
  """The config file's get_config(arg) for 'FILE[:arg]' (to read its default attention and remat)."""
  import importlib.util

  file, _, arg = path.partition(":")  # config files import configs.*: ROOT is first on sys.path
  spec = importlib.util.spec_from_file_location("sweep_config", os.path.join(ROOT, file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


if __name__ == "__main__":
  sys.exit(_common.run(main))
