"""train/step.py's EMA and per-step randomness: one update moves the EMA towards the NEW params by 1 − decay, and
the step's key is fold_in(rng, step), so two steps on the same batch at the same params draw different t, noise,
token mask and condition dropout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import image_only_batch, tiny_config
from iomm_jax import parallel
from iomm_jax.train import builder, step as step_lib

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
B = 8
DECAY = 0.9


def _batch(c):
  return image_only_batch(c, B)


def _perturbed(tree, seed, scale):
  """tree + scale·N(0, 1), leaf by leaf: moves the params off adaLN-Zero's init (where the DiT's output, and with it
  the loss's dependence on t and the noise, is zero) and the EMA off the params."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def stepped():
  """(state, step function): a 1-layer tiny run on one device, ema_decay 0.9, no warm-up (the first update moves the
  params), params and EMA perturbed apart; the step is jitted without donation so the state can be reused."""
  c = tiny_config(train__warmup_steps=0, train__ema_decay=DECAY)
  c.model.dit.arch.num_layers = c.model.dit.arch.num_single_layers = 1
  c.model.mllm.arch.text["num_hidden_layers"] = 1
  c.model.mllm.arch.vision["num_hidden_layers"] = 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  run = builder.build(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:1]))
  state = run.init_state()
  state = state.replace(params=_perturbed(state.params, 1, 0.05), ema_params=_perturbed(state.params, 2, 0.05))
  fn = jax.jit(functools.partial(step_lib.train_step, run.statics, run.optimizer, run.lr_fn))
  batch = _batch(c)
  compiled = fn.lower(state, run.frozen, batch).compile(FAST)
  return state, lambda s: compiled(s, run.frozen, batch)


def test_ema_moves_towards_the_new_params_by_one_minus_decay(stepped):
  """new.ema == decay·old.ema + (1 − decay)·new.params leaf by leaf: not the weights swapped, not the params from
  before the update."""
  state, step = stepped
  new, _ = step(state)
  old_ema, old_p = jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)
  new_ema, new_p = jax.tree.leaves(new.ema_params), jax.tree.leaves(new.params)
  # the update really moved the params, so "from the old params" is distinguishable from "from the new ones"
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(new_p, old_p)) > 1e-3
  for e0, p1, e1 in zip(old_ema, new_p, new_ema):
    want = DECAY * np.asarray(e0, np.float64) + (1 - DECAY) * np.asarray(p1, np.float64)
    np.testing.assert_allclose(np.asarray(e1), want, rtol=1e-6, atol=1e-7)


def test_each_step_draws_its_own_randomness(stepped):
  """The step's key is fold_in(rng, step): the same state at step 0 and at step 1 (same params, same batch) draws
  different t, noise and masks, hence different losses; the same step number gives the same loss."""
  state, step = stepped
  losses = [float(step(state.replace(step=jnp.asarray(s, jnp.int32)))[1]["loss"]) for s in (0, 1, 0)]
  assert losses[0] == losses[2]
  assert abs(losses[0] - losses[1]) > 1e-3 * abs(losses[0]), losses
