"""IOMM conditioning: templates, the token mask, image-token splicing, and the gradient path through the frozen LLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import image_only_batch, tiny_config
from iomm_jax.models import iomm
from iomm_jax.train import builder, step as step_lib


@pytest.fixture(scope="module")
def run():
  return builder.build(tiny_config())


@pytest.mark.parametrize("r", [0.85, 0.45, 0.0])
def test_mask_fraction_matches_ratio(r):
  keep = iomm.sample_keep_mask(jax.random.key(0), (2000, 64), r)
  assert abs(float(1.0 - keep.mean()) - r) < 0.02
  # one Bernoulli per token: rows differ (not a shared mask) and counts vary (not an exact count per image)
  counts = np.asarray(keep.sum(1))
  assert r == 0.0 or counts.std() > 0


@pytest.mark.slow
def test_templates(run):
  tpl = run.templates
  assert len(tpl.image_positions) == run.mcfg.num_image_tokens
  assert (tpl.image_ids[tpl.image_positions] == run.processor.image_token_id).all()
  # left padding: valid tokens are a contiguous suffix
  for valid in (tpl.image_valid, tpl.uncond_valid):
    first = int(np.argmax(valid))
    assert valid[first:].all() and not valid[:first].any()


def test_condition_ids_selects_per_sample(run):
  tpl = run.templates
  ids = run.tokenize("a red circle")
  cap = np.zeros((4, 32), np.int32)
  cap[:, : len(ids)] = ids
  lens = jnp.full((4,), len(ids), jnp.int32)
  out, valid, use = iomm.condition_ids(
      tpl, jnp.asarray(cap), lens, jnp.array([True, False, False, True]), jnp.array([False, False, True, True])
  )
  out, valid = np.asarray(out), np.asarray(valid)
  np.testing.assert_array_equal(out[0], tpl.image_ids)
  np.testing.assert_array_equal(out[1][valid[1]], ids)  # caption, left-padded
  assert valid[1].sum() == len(ids) and valid[1][-1]
  np.testing.assert_array_equal(out[2], tpl.uncond_ids)  # dropped → empty prompt
  np.testing.assert_array_equal(out[3], tpl.uncond_ids)  # a dropped image sample: the empty prompt, no image
  np.testing.assert_array_equal(valid[3], tpl.uncond_valid)
  np.testing.assert_array_equal(np.asarray(use), [True, False, False, False])


def test_splice_zeroes_masked_tokens_in_place(run):
  tpl = run.templates
  b, n, d = 3, len(tpl.image_positions), 8
  emb = jnp.ones((b, tpl.length, d)) * 7.0
  tokens = jax.random.normal(jax.random.key(1), (b, n, d))
  keep = jax.random.bernoulli(jax.random.key(2), 0.5, (b, n))
  use = jnp.array([True, True, False])
  out = np.asarray(iomm.splice_image_tokens(emb, tpl, tokens, keep, use))
  pos = tpl.image_positions
  kept = np.asarray(keep)
  np.testing.assert_allclose(out[0, pos][kept[0]], np.asarray(tokens)[0][kept[0]])
  assert (out[0, pos][~kept[0]] == 0).all()  # masked → zero vector, position kept
  assert (out[2] == 7.0).all()  # text samples untouched
  other = np.setdiff1d(np.arange(tpl.length), pos)
  assert (out[:, other] == 7.0).all()


def _batch(run, n=4, image=True):
  c = run.config
  r, v = c.data.resolution, c.data.vit_size
  rng = np.random.default_rng(0)
  ids = run.tokenize("a red circle")
  cap = np.zeros((n, c.data.max_text_tokens), np.int32)
  cap[:, : len(ids)] = ids
  return {
      "pixels": jnp.asarray(rng.uniform(-1, 1, (n, r, r, 3)), jnp.float32),
      "vit_pixels": jnp.asarray(rng.standard_normal((n, v, v, 3)), jnp.float32),
      "caption_ids": jnp.asarray(cap),
      "caption_len": jnp.full((n,), len(ids), jnp.int32),
      "is_image_only": jnp.full((n,), image),
  }


@pytest.mark.slow
def test_rqa_gets_gradients_through_frozen_llm():
  run = builder.build(tiny_config(train__warmup_steps=0))
  state = run.init_state()
  assert set(state.params) == {"dit", "rqa"}  # no MLLM / ViT / VAE weight is trainable
  # adaLN-Zero: at init the DiT's output projection and gates are zero, so the condition has no gradient yet;
  # a few updates open the path (proj_out, then the gates, then the context stream).
  from iomm_jax import parallel

  batch = parallel.global_batch({k: np.asarray(v) for k, v in _batch(run, n=8).items()}, run.mesh)
  for _ in range(4):
    state, _ = run.train_step(state, run.frozen, batch)
  grads = jax.grad(lambda p: step_lib.compute_loss(run.statics, p, run.frozen, _batch(run), jax.random.key(0))[0])(
      state.params
  )
  rqa_norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads["rqa"]))))
  assert np.isfinite(rqa_norm) and rqa_norm > 0
  mq = np.asarray(grads["rqa"]["meta_queries"])
  assert np.abs(mq).max() > 0  # the queries themselves learn, via the LLM


@pytest.mark.slow
def test_image_condition_changes_the_condition(run):
  """With r = 0 the condition depends on the image; with all tokens masked it does not."""
  state = run.init_state()
  gen = nnx.merge(run.statics.gen_def, state.params)
  mllm = nnx.merge(run.statics.mllm_def, run.frozen["mllm"])
  b = _batch(run, n=2)
  tokens = mllm.encode_image_tokens(b["vit_pixels"])
  ids, valid, use = iomm.condition_ids(
      run.templates, b["caption_ids"], b["caption_len"], b["is_image_only"], jnp.zeros((2,), bool)
  )

  def h(keep_value):
    keep = jnp.full((2, tokens.shape[1]), keep_value)
    return np.asarray(iomm.encode_condition(gen.rqa, mllm, run.templates, ids, valid, tokens, keep, use)[0])

  full, none = h(True), h(False)
  assert np.abs(full[0] - full[1]).max() > 1e-4  # two images → two conditions
  np.testing.assert_allclose(none[0], none[1], atol=1e-5)  # everything masked → identical conditions


@pytest.mark.slow
def test_bf16_frozen_weights_fp32_trainables():
  run = builder.build(tiny_config(model__frozen_dtype="bfloat16"))
  assert {x.dtype for x in jax.tree_util.tree_leaves(run.frozen["mllm"])} == {jnp.dtype(jnp.bfloat16)}
  state = run.init_state()
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype(jnp.float32)}
  loss, _ = step_lib.compute_loss(run.statics, state.params, run.frozen, _batch(run), jax.random.key(0))
  assert np.isfinite(float(loss))


@pytest.mark.slow
def test_x_prediction_turns_the_dit_output_into_a_velocity():
  """prediction='x': the DiT output is the clean latent x̂ and velocity() returns (x_t − x̂)/max(t, t_min); with the
  same weights, prediction='v' returns the raw output."""
  from iomm_jax.models import factory

  cx, cv = tiny_config(model__prediction="x"), tiny_config(model__prediction="v")
  gx, gv = factory.make_generator(cx, nnx.Rngs(0)), factory.make_generator(cv, nnx.Rngs(0))
  # Non-zero output weights (adaLN-Zero starts them at 0, which would hide the difference).
  params = jax.tree.map(
      lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), nnx.state(gv, nnx.Param)
  )
  nnx.update(gv, params)
  nnx.update(gx, params)
  rng = np.random.default_rng(0)
  side, _, ch = builder.build(cx, load_frozen=False).latent_shape
  x_t = jnp.asarray(rng.standard_normal((3, side, side, ch)), jnp.float32)
  t = jnp.asarray([0.9, 0.3, 0.01], jnp.float32)
  h = jnp.asarray(rng.standard_normal((3, 16, gv.rqa.cfg.dim)), jnp.float32)
  m = jnp.ones((3, 16), bool)
  out = gv.velocity(x_t, t, h, m)
  v = gx.velocity(x_t, t, h, m)
  denom = np.maximum(np.asarray(t), iomm.X_PRED_T_MIN)[:, None, None, None]
  np.testing.assert_allclose(np.asarray(v), (np.asarray(x_t) - np.asarray(out)) / denom, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(out)).max() > 1e-3


@pytest.mark.slow
def test_the_configs_mask_ratio_dropout_and_t_distribution_reach_the_step(monkeypatch):
  """train.mask_ratio, train.p_uncond and the t distribution (t_sampling, logit mean/std, time_shift) are what the
  step draws with: the kept fraction of image tokens, the dropped fraction of conditions, and sample_t's options."""
  c = tiny_config(
      train__mask_ratio=0.3,
      train__p_uncond=0.4,
      train__t_sampling="logit_normal",
      train__logit_mean=0.2,
      train__logit_std=0.7,
      train__time_shift=2.5,
  )
  run = builder.build(c)
  st = run.statics
  batch = image_only_batch(c, 256)
  mllm, ae = nnx.merge(st.mllm_def, run.frozen["mllm"]), nnx.merge(st.ae_def, run.frozen["ae"])
  *_, keep, use_image = step_lib.condition_inputs(st, mllm, ae, batch, jax.random.key(3))
  assert abs(float(1.0 - keep.mean()) - 0.3) < 0.02  # the mask ratio, not p_uncond
  assert abs(float(1.0 - use_image.mean()) - 0.4) < 0.08  # condition dropout of image-only samples
  seen = []
  sample_t = step_lib.loss_lib.sample_t

  def recording(rng, batch_size, **kw):
    seen.append(kw)
    return sample_t(rng, batch_size, **kw)

  monkeypatch.setattr(step_lib.loss_lib, "sample_t", recording)
  small = jax.tree.map(lambda x: x[:4], batch)
  loss, _ = step_lib.compute_loss(st, run.init_state().params, run.frozen, small, jax.random.key(1))
  assert np.isfinite(float(loss))
  assert seen == [dict(kind="logit_normal", logit_mean=0.2, logit_std=0.7, shift=2.5)]
