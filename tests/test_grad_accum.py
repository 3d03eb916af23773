"""Gradient accumulation (`config.train.grad_accum`): the update is the mean over strided microbatches, it gives the
same losses on one device and on a (2, 2, 2) mesh, and a batch that does not split evenly is refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from iomm_jax import parallel
from iomm_jax.train import builder, step as step_lib

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
B = 8


def small_config(**overrides):
  c = tiny_config(train__warmup_steps=0, **overrides)
  c.train.global_batch = B
  c.model.dit.arch.num_layers = c.model.dit.arch.num_single_layers = 1
  c.model.mllm.arch.text["num_hidden_layers"] = 1
  c.model.mllm.arch.vision["num_hidden_layers"] = 1
  return c


def make_batch(c, seed):
  rng = np.random.default_rng(seed)
  r, v = c.data.resolution, c.data.vit_size
  return {
      "pixels": rng.uniform(-1, 1, (B, r, r, 3)).astype(np.float32),
      "vit_pixels": rng.normal(size=(B, v, v, 3)).astype(np.float32),
      "caption_ids": np.zeros((B, c.data.max_text_tokens), np.int32),
      "caption_len": np.zeros((B,), np.int32),
      "is_image_only": np.ones((B,), bool),
  }


def run_on(shape, accum):
  c = small_config(train__grad_accum=accum)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
  devices = jax.devices()[: int(np.prod(shape))]
  return builder.build(c, mesh=parallel.make_mesh(c.mesh, devices=devices), load_frozen=False)


@pytest.fixture(scope="module")
def one_device():
  run = run_on((1, 1, 1), 2)
  run.frozen = builder.load_frozen_weights(run.config, run)
  return run, run.init_state()


@pytest.mark.slow
def test_grads_are_the_mean_over_strided_microbatches(one_device):
  run, state = one_device
  batch = {k: jnp.asarray(v) for k, v in make_batch(run.config, 0).items()}
  rng = jax.random.key(7)
  st = run.statics
  assert st.grad_accum == 2
  (loss, aux), grads = (
      jax.jit(lambda p: step_lib.loss_and_grads(st, p, run.frozen, batch, rng))
      .lower(state.params)
      .compile(FAST)(state.params)
  )

  single = dataclasses.replace(st, grad_accum=1)
  grad_fn = jax.jit(
      jax.value_and_grad(lambda p, b, r: step_lib.compute_loss(single, p, run.frozen, b, r), has_aux=True)
  )
  parts = [grad_fn(state.params, {k: v[i::2] for k, v in batch.items()}, jax.random.fold_in(rng, i)) for i in range(2)]
  np.testing.assert_allclose(float(loss), np.mean([float(p[0][0]) for p in parts]), rtol=1e-6)
  assert abs(float(parts[0][0][0]) - float(parts[1][0][0])) > 1e-4  # the two microbatches really differ
  expected = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=0, atol=1e-6 * max(1.0, float(jnp.max(jnp.abs(want))))
    )
  # contiguous halves (rows 0–3, 4–7) are a different split: the strided layout is what is computed
  contiguous = grad_fn(state.params, {k: v[:4] for k, v in batch.items()}, jax.random.fold_in(rng, 0))
  assert abs(float(contiguous[0][0]) - float(parts[0][0][0])) > 1e-4


@pytest.mark.slow
def test_same_losses_on_one_device_and_a_2x2x2_mesh(one_device):
  run1, state1 = one_device
  run8 = run_on((2, 2, 2), 2)
  batches = [make_batch(run1.config, s) for s in (1, 2)]
  losses = {}
  for name, run, state in (("1", run1, state1), ("8", run8, None)):
    state = jax.device_put(jax.device_get(state1), run.state_shardings)
    frozen = jax.device_put(jax.device_get(run1.frozen), run.frozen_shardings)
    out = []
    for b in batches:
      gb = parallel.global_batch(b, run.mesh)
      state, m = run.train_step.lower(state, frozen, gb).compile(FAST)(state, frozen, gb)
      out.append(float(m["loss"]))
    losses[name] = out
  np.testing.assert_allclose(losses["8"], losses["1"], rtol=1e-5)
  assert losses["1"][0] != losses["1"][1]


def test_uneven_accumulation_is_refused():
  with pytest.raises(ValueError, match="grad_accum=3"):
    run_on((1, 1, 1), 3)
  with pytest.raises(ValueError, match="grad_accum=2"):  # 8 images over 8 devices: one per device, not two
    run_on((8, 1, 1), 2)
