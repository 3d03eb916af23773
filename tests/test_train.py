"""End-to-end training on the tiny config: learning, exact resume after SIGKILL, sampling CLI and reconstruction."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, run_app, tiny_config, subprocess_env
from iomm_jax import metrics as metrics_lib
from iomm_jax.train import checkpoint, loop

SHORT = [
    "--config.train.global_batch=8",
    "--config.data.num_images=256",
    "--config.train.log_every=1",
    "--config.train.sample_every=0",
    "--config.train.warmup_steps=5",
]


def _cmd(workdir, steps, ckpt_every):
  return [
      sys.executable,
      "-m",
      "iomm_jax.main",
      "--config=configs/tiny.py",
      f"--workdir={workdir}",
      f"--config.train.num_steps={steps}",
      f"--config.train.ckpt_every={ckpt_every}",
      *SHORT,
  ]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(workdir))}


def _final_params(workdir, step):
  import orbax.checkpoint as ocp

  ck = checkpoint.Checkpointer(str(workdir), with_data=False)
  restored = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ck.close()
  state = restored["state"]
  return {"params": state["params"], "ema_params": state["ema_params"], "opt_state": state["opt_state"]}


@pytest.mark.slow
def test_sigkill_resume_is_exact(tmp_path):
  steps, kill_after = 30, 8
  env = subprocess_env(tmp_path)
  ref = subprocess.run(_cmd(tmp_path / "ref", steps, 4), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  work = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(work, steps, 4), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 400
    while not (work / "checkpoints" / str(kill_after)).is_dir():
      assert proc.poll() is None, "training exited before it could be killed"
      assert time.time() < deadline, "no checkpoint appeared"
      time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)  # freeze at once, then look at what it has done
    done = sorted(int(p) for p in os.listdir(work / "checkpoints") if p.isdigit())
    proc.kill()
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert max(done) < steps, f"the run finished before the kill ({done}); make it longer"
  res = subprocess.run(_cmd(work, steps, 4), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resumed from" in res.stdout
  a, b = _losses(tmp_path / "ref"), _losses(work)
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  for s in range(1, steps + 1):
    assert a[s] == b[s], f"loss differs at step {s}: {a[s]} vs {b[s]}"
  pa, pb = _final_params(tmp_path / "ref", steps), _final_params(work, steps)
  for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The tiny config trained briefly in-process (shared by the learning, sampling and reconstruction tests)."""
  work = tmp_path_factory.mktemp("tiny")
  c = tiny_config()
  c.train.global_batch = 16
  c.train.num_steps = 300
  c.train.warmup_steps = 20
  c.train.log_every = 20
  c.train.ckpt_every = 300
  c.train.sample_every = 300
  c.train.ema_decay = 0.95
  summary = loop.train(c, str(work))
  return work, summary


@pytest.mark.slow
def test_loss_decreases(trained):
  work, summary = trained
  rows = metrics_lib.read_metrics(str(work))
  assert rows[-1]["step"] == 300 and summary["step"] == 300
  first, last = rows[0]["loss"], rows[-1]["loss"]
  assert last < 0.5 * first, (first, last)
  # The metrics row carries values that mean what they say, not just the keys.
  row = rows[-1]
  assert row["lr"] == pytest.approx(tiny_config().train.lr)  # past the 20-step warm-up: the constant lr
  assert np.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
  assert row["images_per_s"] == pytest.approx(16 / row["step_time_s"], rel=1e-6)  # global batch 16
  assert 0.0 <= row["data_wait_fraction"] <= 1.0
  assert 0.0 < row["mfu"] < 1.0
  assert row["skipped_total"] == 0 and row["nonfinite_total"] == 0 and row["steps_averaged"] == 20
  assert (work / "samples" / "step_0000300.png").exists()
  assert any(p.name.startswith("events") for p in (work / "tensorboard").iterdir())


@pytest.mark.slow
def test_samples_follow_their_condition(trained):
  """Same noise, different conditioning images → different samples; same image → the same sample.

  (The reconstruction *margin* needs longer training and the pretrained tiny MLLM: `make demo` measures it with
  python -m iomm_jax.eval_recon; see the README figures.)
  """
  work, _ = trained
  from iomm_jax import eval_recon
  from iomm_jax.train import generate as sample_lib
  from iomm_jax.data.shapes import render
  from iomm_jax.train import restore

  run, params, _ = restore.load_for_inference(str(work))
  imgs = [render(5000 + i, run.config.data.resolution, 0)[0] for i in range(2)]
  vit = np.stack([run.processor.preprocess_image(im) for im in imgs]).astype(np.float32)
  key = jax.random.key(3)
  a = np.asarray(sample_lib.generate(run, params, vit_pixels=vit[[0, 0]], rng=key, steps=6))
  b = np.asarray(sample_lib.generate(run, params, vit_pixels=vit[[0, 1]], rng=key, steps=6))
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # sample 0: same noise, same image
  assert np.abs(a[1] - b[1]).max() > 1e-2  # sample 1: same noise, other image
  stats = eval_recon.margin_stats(eval_recon.mse_matrix(a, np.stack(imgs).astype(np.float32) / 127.5 - 1))
  assert set(stats) == {"mse_to_condition", "mse_to_others", "margin", "top1_retrieval"}
  with pytest.raises(ValueError, match="steps=0: the sampler needs 1 or more"):  # not the config's default
    sample_lib.generate(run, params, vit_pixels=vit[:1], rng=key, steps=0)
  # Sampled a batch at a time: the first batch keeps the seed's key, so a run that fits one batch is unchanged.
  one = eval_recon.evaluate(run, params, num=3, steps=2, batch=64)
  assert eval_recon.evaluate(run, params, num=3, steps=2, batch=3) == one
  split = eval_recon.evaluate(run, params, num=3, steps=2, batch=2)
  assert split != one and all(np.isfinite(v) for v in split.values())


@pytest.mark.slow
def test_sample_cli_writes_grids(trained, tmp_path):
  work, _ = trained
  from PIL import Image
  from iomm_jax.data.shapes import render

  img = tmp_path / "ref.png"
  Image.fromarray(render(5, 32, 0)[0]).save(img)
  r = run_app(
      "iomm_jax.sample",
      f"--workdir={work}",
      "--prompt=a red circle",
      f"--image={img}",
      "--num=3",
      "--steps=4",
      f"--out={tmp_path / 'out'}",
      env=subprocess_env(tmp_path),
      timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert len(out["written"]) == 2
  for w in out["written"]:
    grid = np.asarray(Image.open(w["path"]))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0


@pytest.mark.slow
def test_sample_cli_bad_input(trained, tmp_path):
  work, _ = trained
  bad = tmp_path / "not_an_image.png"
  bad.write_bytes(b"garbage")
  out = tmp_path / "out"
  r = run_app(
      "iomm_jax.sample",
      f"--workdir={work}",
      "--prompt=a red circle",
      f"--image={bad}",
      "--num=1",
      f"--out={out}",
      env=subprocess_env(tmp_path),
      timeout=600,
  )
  assert r.returncode != 0 and "cannot be read" in r.stderr and "Traceback" not in r.stderr
  assert not out.exists()  # every image is read before the prompt's grid would have been written
  # A checkpoint step the run does not have: one line listing the steps it has.
  r = run_app(
      "iomm_jax.sample",
      f"--workdir={work}",
      "--prompt=x",
      "--step=7",
      "--num=1",
      env=subprocess_env(tmp_path),
      timeout=600,
  )
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert (
      r.stderr.strip()
      .splitlines()[-1]
      .endswith("--step=7: no such checkpoint under " f"{work}/checkpoints; it has steps [300]")
  )
