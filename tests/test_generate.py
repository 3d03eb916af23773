"""Generation from a run samples on the training time grid (config.train.time_shift)."""

import jax
import jax.numpy as jnp
import pytest
import numpy as np

from iomm_jax import sampling
from iomm_jax.train import builder
from iomm_jax.train import generate as generate_lib
from helpers import tiny_config


@pytest.mark.slow
def test_sampling_uses_the_training_time_shift(monkeypatch):
  seen = []
  real = sampling.generate

  def recording(*args, shift=1.0, **kw):
    seen.append(shift)
    return real(*args, shift=shift, **kw)

  monkeypatch.setattr(sampling, "generate", recording)
  c = tiny_config("pretrain,short")
  c.train.time_shift = 3.0
  c.sample.steps = 2
  run = builder.build(c)
  params = run.init_state().params
  out = generate_lib.generate(run, params, prompts=["a red circle"], rng=jax.random.key(0))
  assert seen == [3.0]
  assert np.isfinite(np.asarray(out)).all()


def test_time_grid_shift_moves_the_steps_towards_noise():
  plain, shifted = np.asarray(sampling.time_grid(4)), np.asarray(sampling.time_grid(4, 3.0))
  assert plain[0] == shifted[0] == 1.0 and plain[-1] == shifted[-1] == 0.0
  assert (shifted[1:-1] > plain[1:-1]).all()


def test_shift_time_is_the_resolution_shift():
  t = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
  np.testing.assert_allclose(np.asarray(sampling.shift_time(t, 3.0)), [0.0, 0.5, 0.75, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(sampling.shift_time(t, 1.0)), t)


def test_euler_steps_from_noise_to_data_on_the_shifted_grid():
  """The sampler evaluates the velocity at each grid time but the last, steps by (t_next − t), and ends at t = 0."""
  grid = np.asarray(sampling.time_grid(5, 3.0))
  seen = []

  def velocity(x, t):
    jax.debug.callback(lambda tt: seen.append(float(tt[0])), t)
    return jnp.sin(3.0 * x) + t[:, None]  # depends on x and t: a step at the wrong time gives another result

  z = jnp.array([[0.3, -1.2], [2.0, 0.1]], jnp.float32)
  out = np.asarray(sampling.euler(velocity, z, 5, 3.0))
  x = np.asarray(z, np.float64)
  for t, t_next in zip(grid[:-1], grid[1:]):
    x = x + (t_next - t) * (np.sin(3.0 * x) + t)
  np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(seen, grid[:-1], rtol=1e-6)


@pytest.mark.parametrize("w", [0.0, 1.0, 4.5])
def test_guidance_combines_the_halves_as_uncond_plus_w_times_their_difference(w):
  """CFG: the batched velocity's first half is conditional, the second unconditional; v = v_u + w·(v_c − v_u)."""
  c, u = 2.0, -0.5

  def batched(x, t):
    half = x.shape[0] // 2
    return jnp.concatenate([jnp.full_like(x[:half], c), jnp.full_like(x[half:], u)])

  v = np.asarray(sampling.guided(batched, w)(jnp.zeros((3, 4)), jnp.zeros((3,))))
  np.testing.assert_allclose(v, np.full((3, 4), u + w * (c - u)), rtol=1e-6)


def test_tokenize_reports_truncation_and_keeps_the_template_end():
  from iomm_jax.models import iomm
  from iomm_jax.models.processor import Processor

  proc = Processor.tiny()
  full = proc.text_prompt_ids("a red circle above a blue square")
  tok = iomm.Tokenize(proc, len(full) - 2)
  ids, cut = tok.with_truncation("a red circle above a blue square")
  assert cut and len(ids) == len(full) - 2 and ids[-tok.suffix :] == full[-tok.suffix :]
  assert tok.with_truncation("a red circle") == (proc.text_prompt_ids("a red circle"), False)
