"""Flow-matching loss: the velocity target, and the 'clean' loss space's weighting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iomm_jax.train import loss as loss_lib


def _setup():
  x = jax.random.normal(jax.random.key(0), (6, 4, 4, 3))
  x_hat = x + 0.3 * jax.random.normal(jax.random.key(1), x.shape)  # an imperfect clean-latent prediction

  def velocity(x_t, t):  # what an x-predicting model returns: v = (x_t − x̂) / t
    return (x_t - x_hat) / t[:, None, None, None]

  return x, x_hat, velocity


def test_velocity_space_is_the_mse_to_z_minus_x():
  x, _, velocity = _setup()
  loss, aux = loss_lib.flow_matching_loss(velocity, x, jax.random.key(2))
  t = aux["t"]
  # Recompute with the same draws: the loss splits the rng into (t, z) in that order.
  _, rng_z = jax.random.split(jax.random.key(2))
  z = jax.random.normal(rng_z, x.shape)
  x_t = loss_lib.interpolate(x, z, t)
  want = jnp.mean(jnp.square(velocity(x_t, t) - (z - x)), axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(aux["per_sample"]), np.asarray(want), rtol=1e-5)
  assert float(loss) == pytest.approx(float(want.mean()), rel=1e-5)


def test_clean_space_is_the_mse_of_the_implied_clean_latent():
  """'clean' = t² × the velocity loss = ‖x̂ − x‖², whatever t was drawn: the 1/t² weighting is gone."""
  x, x_hat, velocity = _setup()
  _, aux_v = loss_lib.flow_matching_loss(velocity, x, jax.random.key(2))
  loss, aux = loss_lib.flow_matching_loss(velocity, x, jax.random.key(2), space="clean")
  want = jnp.mean(jnp.square(x_hat - x), axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(aux["per_sample"]), np.asarray(want), rtol=1e-4)
  np.testing.assert_allclose(
      np.asarray(aux["per_sample"]), np.asarray(aux_v["per_sample"] * aux_v["t"] ** 2), rtol=1e-5
  )
  with pytest.raises(ValueError, match="train.loss_space"):
    loss_lib.flow_matching_loss(velocity, x, jax.random.key(2), space="x")


def _neighbour_sq_diffs(img: np.ndarray) -> np.ndarray:
  """(B,) mean squared right-neighbour difference + mean squared lower-neighbour difference, by loops."""
  b, h, w, c = img.shape
  out = np.zeros(b)
  for i in range(b):
    dx = [(img[i, y, x + 1, k] - img[i, y, x, k]) ** 2 for y in range(h) for x in range(w - 1) for k in range(c)]
    dy = [(img[i, y + 1, x, k] - img[i, y, x, k]) ** 2 for y in range(h - 1) for x in range(w) for k in range(c)]
    out[i] = np.mean(dx) + np.mean(dy)
  return out


def test_edge_error_is_the_neighbour_differences_on_the_pixel_grid():
  """unfold=f takes the differences between neighbouring *pixels* of a space-to-depth latent, not latent cells."""
  from iomm_jax.models.autoencoder import IdentityAutoencoder

  img = np.asarray(jax.random.normal(jax.random.key(3), (2, 8, 6, 3)))
  np.testing.assert_allclose(np.asarray(loss_lib.edge_error(jnp.asarray(img))), _neighbour_sq_diffs(img), rtol=1e-5)
  latent = IdentityAutoencoder(factor=2).encode(jnp.asarray(img))
  assert latent.shape == (2, 4, 3, 12)
  np.testing.assert_allclose(np.asarray(loss_lib.edge_error(latent, 2)), _neighbour_sq_diffs(img), rtol=1e-5)
  # On the latent grid itself the same tensor gives another figure (differences of cells two pixels apart).
  assert not np.allclose(np.asarray(loss_lib.edge_error(latent, 1)), _neighbour_sq_diffs(img), rtol=1e-2)


def test_edge_weight_adds_the_weighted_edge_error_of_the_target_error():
  x, x_hat, velocity = _setup()
  z = jax.random.normal(jax.random.key(4), x.shape)
  t = jnp.linspace(0.1, 0.9, x.shape[0])
  for space in ("velocity", "clean"):
    base = loss_lib.per_sample_loss(velocity, x, z, t, space=space)
    got = loss_lib.per_sample_loss(velocity, x, z, t, space=space, edge_weight=3.0)
    err = velocity(loss_lib.interpolate(x, z, t), t) - (z - x)
    scale = np.asarray(t) ** 2 if space == "clean" else 1.0
    want = np.asarray(base) + 3.0 * _neighbour_sq_diffs(np.asarray(err)) * scale
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


def test_edge_weight_keeps_the_minimiser():
  """The loss stays a positive-definite quadratic in the error, so over several targets for one input the best
  prediction is still their mean: the gradient vanishes there (an edge term on the prediction itself, a smoothness
  penalty, would move it)."""
  targets = jax.random.normal(jax.random.key(5), (5, 1, 6, 6, 3))
  t = jnp.full((1,), 0.5)

  def total(v, edge_weight):
    return sum(
        loss_lib.per_sample_loss(lambda x_t, tt: v, jnp.zeros_like(v), u, t, space="clean", edge_weight=edge_weight)[0]
        for u in targets
    )  # x = 0, so z − x = u: the target of v is u

  mean = targets.mean(axis=0)
  for w in (0.0, 4.0):
    assert float(jnp.abs(jax.grad(total)(mean, w)).max()) < 1e-5


def test_loss_options_read_the_edge_grid_from_the_autoencoder():
  from helpers import tiny_config

  c = tiny_config(train__edge_weight=2.0)
  assert loss_lib.loss_options(c) == dict(
      space=c.train.loss_space, edge_weight=2.0, edge_unfold=c.model.autoencoder.factor
  )
  assert c.model.autoencoder.factor == 2
  c.model.autoencoder.kind = "flux_vae"
  assert loss_lib.loss_options(c)["edge_unfold"] == 1


def test_a_negative_edge_weight_is_refused():
  from helpers import tiny_config

  from iomm_jax import config_validation
  from iomm_jax.config import ConfigError

  with pytest.raises(ConfigError, match="config.train.edge_weight=-1.0 must be >= 0"):
    config_validation.validate(tiny_config(train__edge_weight=-1.0))


@pytest.mark.slow
def test_the_training_step_adds_the_edge_term():
  """train.edge_weight reaches the step: the same params, batch and rng give the flow loss plus the edge term."""
  import dataclasses

  from helpers import image_only_batch, tiny_config

  from iomm_jax.train import builder
  from iomm_jax.train import step as step_lib

  c = tiny_config(train__edge_weight=2.0)
  run = builder.build(c)
  st = run.statics
  assert st.loss_kwargs == dict(space=c.train.loss_space, edge_weight=2.0, edge_unfold=2)
  batch = image_only_batch(c, 4)
  params = run.init_state().params
  with_edges, _ = step_lib.compute_loss(st, params, run.frozen, batch, jax.random.key(1))
  plain_st = dataclasses.replace(st, loss_kwargs={**st.loss_kwargs, "edge_weight": 0.0})
  plain, _ = step_lib.compute_loss(plain_st, params, run.frozen, batch, jax.random.key(1))
  assert float(with_edges) > 1.05 * float(plain) > 0


def test_uniform_t_draws_follow_the_shifted_uniform_distribution():
  """Training's t under time_shift = s is the shift of a uniform draw: its quantiles are the shifted uniform's."""
  t = np.asarray(loss_lib.sample_t(jax.random.key(0), 40000, kind="uniform", shift=3.0))
  q = np.linspace(0.05, 0.95, 19)
  np.testing.assert_allclose(np.quantile(t, q), 3.0 * q / (1.0 + 2.0 * q), atol=0.01)
  assert 0.0 < t.min() and t.max() < 1.0


def test_logit_normal_t_draws_have_the_configured_mean_and_spread():
  t = np.asarray(loss_lib.sample_t(jax.random.key(1), 40000, kind="logit_normal", logit_mean=0.5, logit_std=0.3))
  logit = np.log(t) - np.log1p(-t)
  assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 0.3) < 0.01
