"""Fault suite: inject each fault into a tiny training run (or `prepare`), and check that the run either ends equal to
the uninterrupted run or stops with one clear line and nothing lost.

    python bench/faults.py [--steps 20] [--keep DIR]

Cases: NaN (lr 1e4 → stop, rerun with a sane lr), two trainers on one workdir, a truncated and a deleted checkpoint
file (fallback to the newest intact one), a full disk (a small tmpfs, when this machine lets us mount one), SIGKILL
during a save, SIGTERM (preemption save), odd images through `python -m iomm_jax.data.prepare`.
Prints ONE JSON line: {faults_injected, survived, equal_to_uninterrupted, records_lost, cases: {...}, seconds}.
`equal_to_uninterrupted` counts the training cases whose final parameters and per-step losses equal the reference
run's; `records_lost` counts metrics rows missing from finished runs plus good images `prepare` did not write.
Exit status 0 when every case run survived (a case this machine cannot set up, as full_disk without root, is
skipped), else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import _common  # noqa: E402

ROOT = _common.ROOT
# The cases by --cases name, in the order they run by default.
CASES = {
    "nan": lambda s: s.nan(),
    "two_trainers": lambda s: s.two_trainers(),
    "truncated": lambda s: s.damaged("truncated"),
    "deleted": lambda s: s.damaged("deleted"),
    "full_disk": lambda s: s.full_disk(),
    "sigkill": lambda s: s.sigkill_during_save(),
    "sigterm": lambda s: s.sigterm(),
    "odd_images": lambda s: s.odd_images(),
}
# The cases checkpoint every 5 steps: a damaged checkpoint needs one at steps - 5, SIGKILL a second save, SIGTERM
# a run still going at step 7.
MIN_STEPS = 10


def base_args(steps: int) -> list[str]:
  # The ',short' variant (batch 16, warm-up 5): the compiled step is the one a smoke run already cached.
  return [
      "--config=configs/tiny.py:pretrain,short",
      f"--config.train.num_steps={steps}",
      "--config.train.ckpt_every=5",
      "--config.train.keep_checkpoints=3",
      "--config.train.log_every=1",
  ]


class Suite:

  def __init__(self, tmp: str, steps: int):
    self.tmp, self.steps = tmp, steps
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(tmp, "xla_cache")
    self.env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    self.cases: dict[str, dict] = {}
    self.ref = None

  def cmd(self, work, *extra):
    return [sys.executable, "-m", "iomm_jax.main", f"--workdir={work}", *base_args(self.steps), *extra]

  def run(self, work, *extra, timeout=1200):
    res = subprocess.run(
        self.cmd(work, *extra), cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
    )
    with open(os.path.join(self.tmp, "runs.log"), "a") as f:  # every run's stderr, for a look afterwards
      f.write(f"==== {work} {' '.join(extra)} → {res.returncode}\n{res.stderr[-5000:]}\n")
    return res

  def start(self, work, *extra):
    return subprocess.Popen(
        self.cmd(work, *extra), cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

  # ---- comparisons --------------------------------------------------------------------------------------------

  def losses(self, work) -> dict:
    from iomm_jax import metrics

    return {r["step"]: r["loss"] for r in metrics.read_metrics(str(work)) if "loss" in r}

  def params(self, work):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from iomm_jax.train import checkpoint

    ck = checkpoint.Checkpointer(str(work), with_data=False)
    state = ck.manager.restore(self.steps, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    ck.close()
    return [
        np.asarray(x) for x in jax.tree_util.tree_leaves({k: state[k] for k in ("params", "ema_params", "opt_state")})
    ]

  def finish(self, name, work, res, **info) -> None:
    """Record a case that should have ended as the uninterrupted run."""
    import numpy as np

    ok = res.returncode == 0
    lost = len(set(range(1, self.steps + 1)) - set(self.losses(work))) if ok else self.steps
    equal = (
        ok
        and self.losses(work) == self.ref_losses
        and all(np.array_equal(a, b) for a, b in zip(self.params(work), self.ref_params))
    )
    self.cases[name] = {
        "survived": ok and lost == 0,
        "equal": bool(equal),
        "records_lost": lost,
        **info,
        **({} if ok else {"error": last_line(res.stderr)}),
    }

  # ---- cases --------------------------------------------------------------------------------------------------

  def reference(self):
    work = os.path.join(self.tmp, "ref")
    res = self.run(work)
    if res.returncode:
      raise SystemExit(f"the reference run failed: {last_line(res.stderr)}")
    self.ref_losses, self.ref_params = self.losses(work), self.params(work)

  def nan(self):
    work = os.path.join(self.tmp, "nan")
    bad = self.run(work, "--config.train.lr=1e4")
    line = last_line(bad.stderr)
    stopped = bad.returncode != 0 and line.startswith("error: non-finite training at step")
    res = self.run(work)  # the person lowers the lr again: resumes from the last finite checkpoint (or step 0)
    self.finish("nan", work, res, stopped_with=line)
    self.cases["nan"]["survived"] &= stopped

  def two_trainers(self):
    work = os.path.join(self.tmp, "two")
    first = self.start(work)
    while not os.path.exists(os.path.join(work, "trainer.lock")) and first.poll() is None:
      time.sleep(0.05)
    second = self.run(work)
    _, err = first.communicate()
    res = subprocess.CompletedProcess(first.args, first.returncode, "", err)
    self.finish("two_trainers", work, res, second=last_line(second.stderr))
    self.cases["two_trainers"]["survived"] &= second.returncode != 0 and "in use by another trainer" in second.stderr

  def damaged(self, how):
    name = f"{how}_checkpoint_file"
    work = os.path.join(self.tmp, name)
    self.run(work, f"--max_steps={self.steps - 5}")  # checkpoints up to steps - 5
    newest = max(int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit())
    data = os.path.join(work, "checkpoints", str(newest), "state", "ocdbt.process_0", "d")
    victim = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
    if how == "truncated":
      with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 3)
    else:
      os.remove(victim)
    res = self.run(work)
    moved = os.path.isdir(os.path.join(work, "damaged_checkpoints", str(newest)))
    self.finish(name, work, res, damaged_step=newest, moved_aside=moved)
    self.cases[name]["survived"] &= moved

  def full_disk(self):
    mnt = os.path.join(self.tmp, "small_fs")
    os.makedirs(mnt)
    # Room for two of the tiny run's ≈8.5 MB checkpoints, not three.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", mnt], capture_output=True).returncode:
      self.cases["full_disk"] = {"skipped": "cannot mount a tmpfs here (needs root)"}
      return
    try:
      work = os.path.join(mnt, "w")
      bad = self.run(work)
      line = last_line(bad.stderr)
      stopped = bad.returncode != 0 and "checkpoint save of step" in line and "bytes free" in line
      saved = sorted(int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit())
      moved = os.path.join(self.tmp, "full_disk_moved")  # the person moves the workdir to a bigger disk
      shutil.copytree(work, moved)
    finally:
      subprocess.run(["umount", "-l", mnt], check=False)
    res = self.run(moved)
    self.finish("full_disk", moved, res, stopped_with=line, checkpoints_left=saved)
    self.cases["full_disk"]["survived"] &= stopped and bool(saved)

  def sigkill_during_save(self):
    work = os.path.join(self.tmp, "sigkill")
    proc = self.start(work)
    ck = os.path.join(work, "checkpoints")
    mid_save = False
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
      names = os.listdir(ck) if os.path.isdir(ck) else []
      if any("orbax-checkpoint-tmp" in n for n in names) and any(n.isdigit() for n in names):
        mid_save = True  # the second save is being written: kill now
        break
      time.sleep(0.005)
    proc.kill()
    proc.communicate()
    res = self.run(work)
    self.finish("sigkill_during_save", work, res, caught_mid_save=mid_save)

  def sigterm(self):
    from iomm_jax.train.preemption import EXIT_PREEMPTED

    work = os.path.join(self.tmp, "sigterm")
    proc = self.start(work)
    while proc.poll() is None and max(self.losses(work), default=0) < 7:
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    res = self.run(work)
    self.finish("sigterm", work, res, exit_status=proc.returncode)
    self.cases["sigterm"]["survived"] &= proc.returncode == EXIT_PREEMPTED

  def odd_images(self):
    """Damaged and odd images through prepare; counts only (the decoding itself belongs to iomm_jax/data)."""
    import numpy as np
    from PIL import Image

    src = os.path.join(self.tmp, "odd_images")
    os.makedirs(src)
    rng = np.random.default_rng(0)
    good = 0
    for i in range(12):
      Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(os.path.join(src, f"good_{i}.png"))
      good += 1
    Image.fromarray((rng.integers(0, 65535, (96, 96))).astype(np.uint16)).save(os.path.join(src, "gray16.png"))
    Image.fromarray(rng.integers(0, 255, (96, 96, 4), dtype=np.uint8), "RGBA").save(os.path.join(src, "rgba.png"))
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).convert("CMYK").save(
        os.path.join(src, "cmyk.jpg")
    )
    good += 3
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(os.path.join(src, "trunc.jpg"))
    with open(os.path.join(src, "trunc.jpg"), "r+b") as f:
      f.truncate(400)
    with open(os.path.join(src, "garbage.png"), "wb") as f:
      f.write(b"not an image")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "iomm_jax.data.prepare",
            f"--src={src}",
            f"--dst={os.path.join(self.tmp, 'odd_out')}",
            "--shards=1",
            "--no_progress",
        ],
        cwd=ROOT,
        env=self.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
      summary = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
      summary = {}
    written = int(summary.get("written", -1))
    self.cases["odd_images"] = {
        "survived": res.returncode == 0 and written == good,
        "good": good,
        "damaged": 2,
        "summary": summary,
        "records_lost": max(0, good - max(written, 0)),
    }


def last_line(text: str) -> str:
  """The run's own last message: tqdm redraws with \\r, so an error may share a line with the progress bar."""
  parts = [p.strip() for line in (text or "").splitlines() for p in re.split(r"\r|(?=error: )", line)]
  parts = [p for p in parts if p and not p.startswith("train:")]
  return parts[-1][:300] if parts else ""


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=_common.count(MIN_STEPS), default=20, help=f"training steps ({MIN_STEPS} or more)")
  ap.add_argument("--keep", default=None, help="keep the workdirs in this folder (default: a temporary one)")
  ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
  a = ap.parse_args(argv)
  cases = [c for c in a.cases.split(",") if c]
  unknown = [c for c in cases if c not in CASES]
  if unknown or not cases:
    what = f"unknown case {', '.join(unknown)}" if unknown else "no case given"
    ap.error(f"argument --cases: {what}; give one or more of {', '.join(CASES)}")
  tmp = a.keep or tempfile.mkdtemp(prefix="iomm_faults_")
  os.makedirs(tmp, exist_ok=True)
  t0 = time.time()
  s = Suite(tmp, a.steps)
  s.reference()
  for name in cases:
    try:
      CASES[name](s)
    except Exception as e:  # noqa: BLE001 — a case that crashes the suite counts as not survived
      s.cases[name] = {"survived": False, "error": f"{type(e).__name__}: {e}"[:300]}
  done = {k: v for k, v in s.cases.items() if "skipped" not in v}
  print(
      json.dumps(
          {
              "faults_injected": len(done),
              "survived": sum(bool(v.get("survived")) for v in done.values()),
              "equal_to_uninterrupted": sum(bool(v.get("equal")) for v in done.values()),
              "records_lost": sum(int(v.get("records_lost", 0)) for v in done.values()),
              "cases": s.cases,
              "seconds": round(time.time() - t0, 1),
          }
      )
  )
  if not a.keep:
    shutil.rmtree(tmp, ignore_errors=True)
  return 0 if all(v.get("survived") for v in done.values()) else 1


if __name__ == "__main__":
  sys.exit(_common.run(main))
