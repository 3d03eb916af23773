"""Multi-process training through launch/local.sh (CPU, gloo): 2 processes × 4 devices against 1 process × 8,
resume across process counts and meshes, and a killed process that must not leave its peer hanging.

Every run is a subprocess group started by the launcher on a free port; the fixture kills whatever is left on
failure. The model is the tiny config cut to one block per stack, compiled with unoptimised CPU code generation.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local.sh")
SMALL = [
    "--config=configs/tiny.py:short",
    "--config.train.global_batch=8",
    "--config.train.log_every=1",
    "--config.train.warmup_steps=0",
    "--config.train.sample_every=0",
    "--config.data.num_images=256",
    "--config.model.dit.arch.num_layers=1",
    "--config.model.dit.arch.num_single_layers=1",
    "--config.model.mllm.arch.text.num_hidden_layers=1",
    "--config.model.mllm.arch.vision.num_hidden_layers=1",
]
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
RTOL = 1e-5

pytestmark = pytest.mark.slow


def _env(**extra):
  env = dict(os.environ)
  env["XLA_FLAGS"] = FAST_XLA  # the launcher adds the per-process device count
  env["JAX_PLATFORMS"] = "cpu"
  env["IOMM_PYTHON"] = sys.executable
  env["PYTHONUNBUFFERED"] = "1"
  env.update(extra)
  return env


class Launcher:
  """Starts launch/local.sh in its own process group; `stop()` kills the whole group (used on test failure)."""

  def __init__(self):
    self.procs = []

  def start(self, n, args, log, **env):
    f = open(log, "w")
    p = subprocess.Popen(
        ["bash", LAUNCH, str(n), *args],
        cwd=ROOT,
        env=_env(**env),
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    self.procs.append((p, f))
    return p

  def run(self, n, args, log, timeout=600, **env):
    p = self.start(n, args, log, **env)
    try:
      rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.stop()
      raise AssertionError(f"launch/local.sh {n} did not finish in {timeout}s; log: {_tail(log)}")
    assert rc == 0, f"launch/local.sh {n} failed with {rc}:\n{_tail(log)}"

  def stop(self):
    for p, f in self.procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        p.wait()
      f.close()


def _tail(path, n=40):
  with open(path, errors="replace") as f:
    lines = [l for l in f if "Gloo" not in l]
  return "".join(lines[-n:])


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"duplicate metric rows {steps}: more than one process wrote metrics"
  return {r["step"]: r["loss"] for r in rows}


@pytest.fixture
def launcher():
  lau = Launcher()
  yield lau
  lau.stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Reference 1 process × 8 devices on (2,2,2) for 3 steps; 2 processes × 4 devices on (2,2,2) for 2 steps
  (checkpoint at 2); then 1 process × 8 devices on (1,4,2) resuming that checkpoint for step 3."""
  tmp = tmp_path_factory.mktemp("mp")
  lau = Launcher()
  mesh222 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
  mesh142 = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]
  steps = ["--config.train.num_steps=3", "--config.train.ckpt_every=2"]
  try:
    ref, two = str(tmp / "ref"), str(tmp / "two")
    lau.run(1, SMALL + steps + mesh222 + [f"--workdir={ref}"], str(tmp / "ref.log"))
    profile = ["--config.train.profile_steps=1,1"]  # each process traces its second step into its own folder
    lau.run(2, SMALL + steps + mesh222 + profile + [f"--workdir={two}", "--max_steps=2"], str(tmp / "two.log"))
    two_losses = _losses(two)
    resume = lau.start(1, SMALL + steps + mesh142 + [f"--workdir={two}"], str(tmp / "resume.log"))
    resume_rc = resume.wait(timeout=600)
    return {
        "ref": _losses(ref),
        "ref_dir": ref,
        "two": two_losses,
        "two_dir": two,
        "resume_rc": resume_rc,
        "resume_log": str(tmp / "resume.log"),
        "resumed": _losses(two),
    }
  finally:
    lau.stop()


def test_two_processes_train_and_checkpoint(runs):
  assert sorted(runs["two"]) == [1, 2]  # metrics from process 0 only (no duplicate rows)
  ckpts = os.listdir(os.path.join(runs["two_dir"], "checkpoints"))
  assert "2" in ckpts, ckpts


def test_each_process_writes_its_own_profile(runs):
  """Processes on one host would overwrite each other's `<host>.xplane.pb` in a shared folder: each has its own."""
  for k in (0, 1):
    folder = os.path.join(runs["two_dir"], "profile", f"process_{k}")
    assert glob.glob(os.path.join(folder, "plugins", "profile", "*", "*.xplane.pb")), folder
    with open(os.path.join(folder, "op_summary.json")) as f:
      assert json.load(f)["op_s_per_step"] > 0
  assert not os.path.exists(os.path.join(runs["two_dir"], "profile", "op_summary.json"))


def test_two_processes_match_one_process(runs):
  """Each process reads a contiguous block of every global batch, so 2 × 4 devices equal 1 × 8 devices."""
  for step in (1, 2):
    assert runs["two"][step] == pytest.approx(runs["ref"][step], rel=RTOL), (step, runs["two"], runs["ref"])


def test_resume_two_processes_onto_one_on_another_mesh(runs):
  """Checkpoint of 2 processes × 4 devices on (2,2,2) → 1 process × 8 devices on (1,4,2): continues at step 3
  with the uninterrupted run's loss."""
  assert runs["resume_rc"] == 0, _tail(runs["resume_log"])
  assert sorted(runs["resumed"]) == [1, 2, 3]
  assert runs["resumed"][3] == pytest.approx(runs["ref"][3], rel=RTOL), (runs["resumed"], runs["ref"])


def test_stage2_warm_start_reads_the_weights_on_two_processes(runs, tmp_path, launcher):
  """init.workdir (only the generator weights, through Orbax's partial restore) from a 1-process run, read by 2
  processes × 4 devices and by 1 × 8 on another mesh: the same first stage-2 loss."""
  stage2 = [a.replace("configs/tiny.py:short", "configs/tiny.py:finetune,short") for a in SMALL] + [
      "--config.train.num_steps=1",
      f"--config.init.workdir={runs['ref_dir']}",
  ]
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  launcher.run(
      2, stage2 + ["--config.mesh.fsdp=2", "--config.mesh.tensor=2", f"--workdir={two}"], str(tmp_path / "a.log")
  )
  launcher.run(
      1, stage2 + ["--config.mesh.fsdp=4", "--config.mesh.tensor=2", f"--workdir={one}"], str(tmp_path / "b.log")
  )
  assert _losses(two)[1] == pytest.approx(_losses(one)[1], rel=RTOL)


def test_killed_process_stops_its_peer(tmp_path, launcher):
  """SIGKILL process 1 mid-training: process 0 reports the lost peer and exits non-zero, well within the bound."""
  heartbeat = 5
  pid_dir, log, work = tmp_path / "pids", str(tmp_path / "kill.log"), str(tmp_path / "w")
  p = launcher.start(
      2,
      SMALL
      + [
          "--config.train.num_steps=100000",
          "--config.train.ckpt_every=100000",
          f"--config.distributed.heartbeat_timeout_s={heartbeat}",
          f"--workdir={work}",
      ],
      log,
      IOMM_PID_DIR=str(pid_dir),
      IOMM_GRACE_S="120",
  )
  metrics = os.path.join(work, "metrics.jsonl")
  deadline = time.time() + 420
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert p.poll() is None, f"the run ended before training started:\n{_tail(log)}"
    assert time.time() < deadline, f"training did not start:\n{_tail(log)}"
    time.sleep(1)
  os.kill(int((pid_dir / "p1.pid").read_text()), signal.SIGKILL)
  killed = time.time()
  try:
    rc = p.wait(timeout=heartbeat + 60)
  except subprocess.TimeoutExpired:
    raise AssertionError(f"process 0 still running {heartbeat + 60}s after its peer died:\n{_tail(log)}")
  elapsed = time.time() - killed
  out = _tail(log, 200)
  assert rc != 0
  assert "killing them" not in out, "the launcher had to kill a hung process"
  assert "process 0 (pid" in out and "exited with status" in out
  # our watchdog's message, or JAX's own coordination-service abort, whichever fires first
  assert (
      "IOMM DISTRIBUTED FAILURE: process 0 of 2: peer process(es) [1]" in out or "stopped sending heartbeats" in out
  ), out
  assert elapsed < heartbeat + 60


def test_feature_cache_from_two_processes_equals_one_process(tmp_path, launcher):
  """`python -m iomm_jax.cache` on 2 processes × 4 devices writes the same features, in the same record order, as
  on 1 process × 8 devices (each process encodes a contiguous range; shard names sort into source order)."""
  import numpy as np

  from iomm_jax.data import shapes_shards, sources

  num = 20  # not a multiple of the batch: the last batch of each process is padded
  src = tmp_path / "src"
  shapes_shards.write_arrayrecord(src, num, 64, seed=3, shards=2, progress=False)
  base = SMALL + ["--config.data.source=arrayrecord", f"--config.data.path={src}", "--shards=2", "--no_progress"]
  for n in (1, 2):
    launcher.run(
        n, base + [f"--dst={tmp_path / f'cache{n}'}"], str(tmp_path / f"cache{n}.log"), IOMM_MODULE="iomm_jax.cache"
    )
  one, two = sources.ArrayRecordSource(str(tmp_path / "cache1")), sources.ArrayRecordSource(str(tmp_path / "cache2"))
  assert len(one) == len(two) == num
  assert len(os.listdir(tmp_path / "cache2")) > len(os.listdir(tmp_path / "cache1"))  # per-process shard files
  for i in range(num):
    a, b = one[i], two[i]
    assert a["id"] == b["id"], i
    for key in ("vit_tokens", "latent"):
      np.testing.assert_allclose(
          np.asarray(b[key], np.float32), np.asarray(a[key], np.float32), rtol=0, atol=2e-3, err_msg=f"record {i} {key}"
      )
  assert not np.allclose(np.asarray(one[0]["vit_tokens"], np.float32), np.asarray(one[1]["vit_tokens"], np.float32))
