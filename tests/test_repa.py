"""Representation alignment (`config.train.repa_weight`): the loss, the DiT's inner tokens, the training step and
the checks that keep a run consistent."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import image_only_batch, tiny_config, with_tiny_s3dit
from iomm_jax import config as config_lib
from iomm_jax import config_validation
from iomm_jax.models import factory, repa
from iomm_jax.train import builder, step as step_lib

identity = lambda x: x  # noqa: E731  (a stand-in projector: alignment_loss only calls it)


def test_alignment_loss_compares_on_the_coarser_grid():
  target = jax.random.normal(jax.random.key(0), (2, 16, 5))  # a 4×4 grid of MLLM tokens
  grid = target.reshape(2, 4, 4, 5)
  fine = jnp.repeat(jnp.repeat(grid, 2, axis=1), 2, axis=2)  # the same picture on the DiT's 8×8 grid
  np.testing.assert_allclose(repa.alignment_loss(identity, fine, target), 0.0, atol=1e-5)
  np.testing.assert_allclose(repa.alignment_loss(identity, -fine, target), 2.0, atol=1e-5)
  # The tokens of another image are not aligned: the loss sits between the two bounds.
  other = jax.random.normal(jax.random.key(1), fine.shape)
  assert 0.5 < float(repa.alignment_loss(identity, other, target).mean()) < 1.5
  # Per sample: only the second sample is flipped.
  mixed = fine.at[1].set(-fine[1])
  np.testing.assert_allclose(repa.alignment_loss(identity, mixed, target), [0.0, 2.0], atol=1e-5)
  # A coarser DiT grid than the MLLM's: the target is averaged down to it instead.
  coarse = grid.reshape(2, 2, 2, 2, 2, 5).mean(axis=(2, 4))
  np.testing.assert_allclose(repa.alignment_loss(identity, coarse, jnp.repeat(target, 4, 1)[:, ::4]), 0.0, atol=1e-5)


def test_non_square_mllm_tokens_are_refused():
  with pytest.raises(ValueError, match="12 image tokens do not form a square grid"):
    repa.alignment_loss(identity, jnp.ones((1, 4, 4, 3)), jnp.ones((1, 12, 3)))


@pytest.mark.parametrize("kind", ["mmdit", "s3dit"])
def test_features_come_from_the_same_forward_pass(kind):
  c = tiny_config(train__repa_weight=0.5)
  if kind == "s3dit":
    c = with_tiny_s3dit(c)
  gen = factory.make_generator(c, nnx.Rngs(0))
  assert gen.repa is not None
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 12))
  h = jax.random.normal(jax.random.key(1), (2, 16, gen.rqa.cfg.dim))
  mask, t = jnp.ones((2, 16), bool), jnp.array([0.3, 0.9])
  v, feats = gen.velocity_and_features(x, t, h, mask)
  np.testing.assert_allclose(v, gen.velocity(x, t, h, mask), rtol=1e-5, atol=1e-5)
  patch = 2  # both tiny DiTs tokenise 2×2 latent cells
  assert feats.shape[:3] == (2, 8 // patch, 8 // patch)
  # The features depend on the input image: they are the image tokens, not a constant.
  _, other = gen.velocity_and_features(x + 1.0, t, h, mask)
  assert float(jnp.abs(other - feats).max()) > 1e-3
  # Without REPA the generator has no head (and no parameters for it in checkpoints).
  plain = factory.make_generator(tiny_config() if kind == "mmdit" else with_tiny_s3dit(tiny_config()), nnx.Rngs(0))
  assert plain.repa is None and "repa" not in nnx.to_pure_dict(nnx.state(plain, nnx.Param))


def _batch(c, seed, b=8):
  return image_only_batch(c, b, seed)


@pytest.mark.slow
def test_the_step_adds_the_weighted_alignment_and_trains_the_head():
  c = tiny_config(train__repa_weight=0.5, train__warmup_steps=0, train__lr=3e-3)
  run = builder.build(c)
  st = run.statics
  assert st.repa_weight == 0.5 and st.needs_vit
  state = run.init_state()
  batch, rng = _batch(c, 0), jax.random.key(3)
  loss, aux = step_lib.compute_loss(st, state.params, run.frozen, batch, rng)
  # The same flow loss as a run without REPA (same params, batch and rng), plus weight × alignment.
  flow, _ = step_lib.compute_loss(dataclasses.replace(st, repa_weight=0.0), state.params, run.frozen, batch, rng)
  np.testing.assert_allclose(loss, flow + 0.5 * aux["repa"], rtol=1e-5)
  assert 0.0 < float(aux["repa"]) < 2.0
  grads = jax.grad(lambda p: step_lib.compute_loss(st, p, run.frozen, batch, rng)[0])(state.params)
  assert float(jnp.abs(grads["repa"]["fc3"]["kernel"]).max()) > 0
  # Training on one batch lowers the alignment loss.
  step = jax.jit(lambda s, b: step_lib.train_step(st, run.optimizer, run.lr_fn, s, run.frozen, b))
  first = None
  for _ in range(15):
    state, metrics = step(state, batch)
    first = float(metrics["repa"]) if first is None else first
  assert float(metrics["repa"]) < 0.8 * first


def test_a_negative_weight_is_refused():
  with pytest.raises(config_lib.ConfigError, match="config.train.repa_weight=-0.1 must be >= 0"):
    config_validation.validate(tiny_config(train__repa_weight=-0.1))
