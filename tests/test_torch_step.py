"""bench/torch_step.py's JAX side: the DiT-only step split over several host devices is the same computation."""

import sys

import jax
import numpy as np

from helpers import ROOT, tiny_config

sys.path.insert(0, ROOT)
from bench import torch_step  # noqa: E402


def _losses(config, devices, steps=2):
  run = torch_step.jax_dit_step(config, *torch_step._shapes(config), devices=devices)
  return [float(run()) for _ in range(steps)], run.devices


def test_data_parallel_dit_step_equals_the_single_device_step():
  config = tiny_config()  # global batch 8
  one, n1 = _losses(config, jax.devices()[:1])
  two, n2 = _losses(config, jax.devices()[:2])
  assert (n1, n2) == (1, 2)
  np.testing.assert_allclose(two, one, rtol=2e-5)
  assert one[1] != one[0]  # the second step ran on updated parameters


def test_default_devices_are_the_most_that_divide_the_batch():
  assert len(jax.devices()) == 8
  config = tiny_config()
  config.train.global_batch = 12
  assert torch_step.jax_dit_step(config, *torch_step._shapes(config)).devices == 6
