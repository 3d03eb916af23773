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
