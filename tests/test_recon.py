"""IOMM works at tiny scale: after a short run, self-conditioned samples reproduce their conditioning image.

The tiny config's frozen MLLM is random, so its hidden states carry little image information and the demo needs
1200 steps for a held-out margin of 1.14. Here the signal is made easy to learn, with every lever set from this
file on top of configs/tiny.py (no model code changes):
  - 8 very distinct training images made here (2×2 quadrants of saturated colours, any two differing in every
    quadrant); the samples are judged against these same images, so this shows that the conditioning path
    works (memorisation), not generalisation (the demo reports held-out figures);
  - r = 0 (no ViT token is masked) and model.condition = 'all' (the DiT sees the LLM's hidden states at every
    position, the image positions included; 'query' also learns, more slowly);
  - a smaller stack (1 ViT layer, 1 LLM layer, 1 double-stream DiT block), LR 3e-3, no EMA, 200 steps of
    batch 8, 10 Euler steps for sampling, and one device (no SPMD partitioning or all-reduces to compile).
The images still go ViT → projector → frozen LLM (with the trainable RQA queries) → DiT, as in training, and
p_uncond stays 0.1 so that classifier-free guidance has an unconditional branch.

Control: the same model, with the same noise, sampled with each image's condition replaced by its neighbour's,
must produce the neighbour's image: the margin comes from the condition, not from the noise or memorised order.
(A model trained with p_uncond = 1, i.e. never shown the image, gives own/others ≈ 1.0 and top-1 0.)
"""

import json

import jax
import numpy as np
import pytest

from helpers import tiny_config
from iomm_jax import eval_recon, parallel
from iomm_jax.train import generate as sample_lib
from iomm_jax.train import builder

NUM_IMAGES = 8  # also the batch: every step sees each image once
STEPS = 200
# Saturated, mutually distant colours (uint8 RGB).
PALETTE = np.array(
    [
        [215, 35, 35],
        [30, 160, 60],
        [35, 75, 215],
        [235, 195, 10],
        [135, 50, 185],
        [245, 135, 25],
        [25, 25, 25],
        [240, 240, 240],
    ],
    np.uint8,
)


def quadrant_images(num: int, resolution: int, seed: int = 0) -> np.ndarray:
  """(num, R, R, 3) uint8, num ≤ 8: 2×2 grids of four palette colours, colour of quadrant q in image i =
  palette[(i + 3q) mod 8] (palette order shuffled by `seed`), so any two images differ in every quadrant."""
  if num > len(PALETTE):
    raise ValueError(f"quadrant_images: at most {len(PALETTE)} images, asked for {num}")
  palette = PALETTE[np.random.default_rng(seed).permutation(len(PALETTE))]
  half = resolution // 2
  out = np.zeros((num, resolution, resolution, 3), np.uint8)
  for i in range(num):
    for q in range(4):
      y, x = divmod(q, 2)
      out[i, y * half : (y + 1) * half, x * half : (x + 1) * half] = palette[(i + 3 * q) % len(PALETTE)]
  return out


def recon_config(seed: int = 0):
  """configs/tiny.py plus the levers listed in the module docstring."""
  c = tiny_config()
  c.seed = seed
  c.train.global_batch = NUM_IMAGES
  c.train.num_steps = STEPS
  c.train.mask_ratio = 0.0
  c.train.lr = 3e-3
  c.train.warmup_steps = 10
  c.train.ema_decay = 0.0
  c.model.condition = "all"
  c.model.mllm.arch.vision.num_hidden_layers = 1
  c.model.mllm.arch.text.num_hidden_layers = 1
  c.model.dit.arch.num_layers = 1
  c.model.dit.arch.num_single_layers = 0
  c.sample.steps = 10
  return c


def train_on_quadrants(seed: int = 0):
  """(run, params, reference images in [-1, 1], their ViT views, per-step losses) after STEPS updates."""
  c = recon_config(seed)
  run = builder.build(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:1]))
  images = quadrant_images(NUM_IMAGES, c.data.resolution, seed)
  refs = images.astype(np.float32) / 127.5 - 1.0
  vit = np.stack([run.processor.preprocess_image(im) for im in images]).astype(np.float32)
  batch = parallel.global_batch(
      {
          "pixels": refs,
          "vit_pixels": vit,
          "caption_ids": np.zeros((NUM_IMAGES, c.data.max_text_tokens), np.int32),
          "caption_len": np.zeros((NUM_IMAGES,), np.int32),
          "is_image_only": np.ones((NUM_IMAGES,), bool),
      },
      run.mesh,
  )
  state = run.init_state()
  losses = []
  for _ in range(STEPS):
    state, metrics = run.train_step(state, run.frozen, batch)
    losses.append(float(metrics["loss"]))  # one step in flight at a time
  return run, state.params, refs, vit, np.asarray(losses)


def sample_own_and_swapped(run, params, vit, seed: int = 0):
  """Samples from the same noise: conditioned on each image, then on its neighbour's image (the control)."""
  key = jax.random.key(seed)
  own = np.asarray(sample_lib.generate(run, params, vit_pixels=vit, rng=key))
  neighbour = np.roll(np.arange(len(vit)), 1)
  swapped = np.asarray(sample_lib.generate(run, params, vit_pixels=vit[neighbour], rng=key))
  return own, swapped, neighbour


@pytest.fixture(scope="module")
def trained():
  return train_on_quadrants()


@pytest.fixture(scope="module")
def samples(trained):
  run, params, _, vit, _ = trained
  return sample_own_and_swapped(run, params, vit)


@pytest.mark.slow
def test_samples_reconstruct_their_conditioning_image(trained, samples):
  _, _, refs, _, losses = trained
  own, _, _ = samples
  assert losses[-10:].mean() < 0.3 * losses[:10].mean(), (losses[:10].mean(), losses[-10:].mean())
  stats = eval_recon.margin_stats(eval_recon.mse_matrix(own, refs))
  ratio = stats["mse_to_condition"] / stats["mse_to_others"]
  print(f"own/others {ratio:.3f}, top-1 {stats['top1_retrieval']:.2f} (chance {1 / NUM_IMAGES:.2f}), {stats}")
  assert ratio < 0.8, f"samples are not closer to their conditioning image: {stats}"
  assert stats["top1_retrieval"] >= 0.5, f"top-1 retrieval near chance ({1 / NUM_IMAGES:.2f}): {stats}"


@pytest.mark.slow
def test_margin_comes_from_the_condition(trained, samples):
  """Same noise, neighbour's condition → the neighbour's image, and no longer the original one."""
  _, _, refs, _, _ = trained
  own, swapped, neighbour = samples
  m = eval_recon.mse_matrix(swapped, refs)
  follows = float(np.mean(np.argmin(m, axis=1) == neighbour))
  stays = float(np.mean(np.argmin(m, axis=1) == np.arange(NUM_IMAGES)))
  stats = eval_recon.margin_stats(m[:, neighbour])  # column i = the image sample i was conditioned on
  ratio = stats["mse_to_condition"] / stats["mse_to_others"]
  changed = float(np.mean(np.abs(swapped - own)))
  print(
      f"swapped condition: follows {follows:.2f}, stays {stays:.2f}, own/others {ratio:.3f}, " f"mean |Δ| {changed:.3f}"
  )
  assert changed > 0.1, f"the condition does not change the samples (mean |Δ| {changed:.4f})"
  assert follows >= 0.5 and stays <= 0.25, f"samples do not follow the swapped condition ({follows=}, {stays=})"
  assert ratio < 0.8, f"swapped-condition samples are not closer to the new condition: {stats}"


def test_mse_matrix_is_each_pair_s_mean_squared_error_and_scales_to_many_images():
  rng = np.random.default_rng(0)
  s, r = rng.uniform(-1, 1, (5, 4, 4, 3)), rng.uniform(-1, 1, (5, 4, 4, 3))
  m = eval_recon.mse_matrix(s, r)
  for i in range(5):
    for j in range(5):
      np.testing.assert_allclose(m[i, j], np.mean((s[i] - r[j]) ** 2), rtol=1e-12)
  assert eval_recon.mse_matrix(s, s).diagonal().max() < 1e-12 and (m >= 0).all()
  # 3000 images of 32²: a (K, K, pixels) difference tensor would need 221 GB; the matrix alone needs 72 MB.
  big = rng.uniform(-1, 1, (3000, 3072)).astype(np.float32)
  assert eval_recon.mse_matrix(big, big[::-1]).shape == (3000, 3000)


def test_fewer_than_two_images_have_no_margin():
  with pytest.raises(ValueError, match="num=1: the margin compares each sample with the other images"):
    eval_recon.evaluate(None, None, num=1)


def test_eval_recon_refuses_a_run_trained_on_other_data_before_loading_it(tmp_path, monkeypatch):
  """Its images are procedural shapes: a run on other data would be scored out of its domain without a word."""
  (tmp_path / "config.json").write_text(json.dumps({"data": {"source": "arrayrecord", "path": "/data/shards"}}))

  def no_load(*a, **k):
    raise AssertionError("the model was loaded")

  monkeypatch.setattr(eval_recon.restore, "load_for_inference", no_load)
  with pytest.raises(SystemExit) as e:  # the refusal comes before the model loads
    eval_recon.main([f"--workdir={tmp_path}"])
  assert isinstance(e.value.code, str) and "\n" not in e.value.code
  assert "data.source='arrayrecord'" in e.value.code and "--shapes_anyway" in e.value.code
  assert eval_recon.trained_on(tmp_path) == "arrayrecord" and eval_recon.trained_on(tmp_path / "none") is None


def test_eval_recon_loads_the_checkpoint_and_weights_asked_for(tmp_path, monkeypatch):
  (tmp_path / "config.json").write_text(json.dumps({"data": {"source": "shapes"}}))
  asked = []

  def record(workdir, **kw):
    asked.append(kw)
    raise SystemExit("stop after the load")

  monkeypatch.setattr(eval_recon.restore, "load_for_inference", record)
  for argv, want in (([], (None, None)), (["--step=40", "--no-ema"], (40, False)), (["--use-ema"], (None, True))):
    with pytest.raises(SystemExit):
      eval_recon.main([f"--workdir={tmp_path}", *argv])
    assert asked.pop() == dict(zip(("step", "use_ema"), want))


def test_margin_stats_on_a_hand_matrix():
  """Rows are samples, columns the images: the margin is the mean off-diagonal error over the mean diagonal one,
  top-1 counts the samples whose nearest image (along the row) is their own."""
  m = np.array([[1.0, 4.0, 5.0], [2.0, 1.0, 6.0], [9.0, 1.5, 2.0]])
  stats = eval_recon.margin_stats(m)
  assert stats["mse_to_condition"] == pytest.approx(4.0 / 3.0)
  assert stats["mse_to_others"] == pytest.approx(27.5 / 6.0)
  assert stats["margin"] == pytest.approx((27.5 / 6.0) / (4.0 / 3.0))
  assert stats["top1_retrieval"] == pytest.approx(2.0 / 3.0)  # sample 2 is nearer image 1; every column's own is


def test_perfect_reconstructions_score_zero_error_and_full_retrieval(monkeypatch):
  """evaluate() compares the samples with its held-out images in the samples' range, [-1, 1]: a generator that
  returns each conditioning image exactly scores error 0 and top-1 1.0, in batches of any size."""
  from types import SimpleNamespace

  from iomm_jax.data import decode
  from iomm_jax.data.sources import heldout_shapes

  c = tiny_config()
  images, vit = heldout_shapes(c.data, 5, start=1000)
  by_vit = {np.asarray(v).tobytes(): decode.to_signed_unit(img) for v, img in zip(vit, images)}

  def perfect(run, params, *, vit_pixels, **kw):
    return np.stack([by_vit[np.asarray(v).tobytes()] for v in vit_pixels])

  monkeypatch.setattr(eval_recon.sample_lib, "generate", perfect)
  stats = eval_recon.evaluate(SimpleNamespace(config=c), None, num=5, batch=2)
  assert stats["mse_to_condition"] < 1e-12 and stats["top1_retrieval"] == 1.0 and stats["mse_to_others"] > 0.01
