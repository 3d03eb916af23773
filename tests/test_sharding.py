"""Sharding: logical axes on every parameter, the step's losses on 1 device vs 8-device meshes, a checkpoint
resharded from one mesh onto another, and remat policies that leave the loss unchanged.

One small run per mesh is compiled once (module cache) and shared by the tests; the model is the tiny config cut
to one block per stack so that five step compilations fit the time budget of a 2-core machine.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import load_config, tiny_config
from iomm_jax import parallel
from iomm_jax.config import DEFAULT_RULES
from iomm_jax.models import factory
from iomm_jax.train import builder, checkpoint, loop, state as state_lib, step as step_lib

ALLOWED_AXES = {"embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", "layers", None}
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
NUM_STEPS = 3
RTOL = 1e-5


# ---------------------------------------------------------------- logical axes on every parameter (full size)


def _full_size_states():
  """Abstract nnx.States of the DiTs (MM-DiT of IOMM-B, S3-DiT of IOMM-XL), RQA, MLLM and FLUX VAE at full width
  (one block per stack: every parameter kind, without the tracing time of 30 identical blocks)."""
  cb, cxl = load_config("iomm_b"), load_config("iomm_xl")
  cb.model.dit.arch.num_layers = cb.model.dit.arch.num_single_layers = 1
  cxl.model.dit.arch.n_layers = cxl.model.dit.arch.n_refiner_layers = 1
  cb.model.mllm.arch = {"text": {"num_hidden_layers": 1}, "vision": {"num_hidden_layers": 1}}
  mcfg = factory.mllm_config(cb)
  gen_b = nnx.eval_shape(lambda: factory.make_generator(cb, nnx.Rngs(0), mcfg))
  gen_xl = nnx.eval_shape(lambda: factory.make_generator(cxl, nnx.Rngs(0), mcfg))
  return {
      "mmdit": nnx.state(gen_b.dit, nnx.Param),
      "s3dit": nnx.state(gen_xl.dit, nnx.Param),
      "rqa": nnx.state(gen_b.rqa, nnx.Param),
      "mllm": nnx.state(nnx.eval_shape(lambda: factory.make_mllm(cb, nnx.Rngs(0), mcfg)), nnx.Param),
      "vae": nnx.state(nnx.eval_shape(lambda: factory.make_ae(cb, nnx.Rngs(0))), nnx.Param),
  }


@pytest.fixture(scope="module")
def full_states():
  return _full_size_states()


@pytest.mark.parametrize("name", ["mmdit", "s3dit", "rqa", "mllm", "vae"])
def test_every_param_has_logical_axes(full_states, name):
  flat = list(nnx.to_flat_state(full_states[name]))
  assert len(flat) > 3
  for path, var in flat:
    axes = var.get_metadata().get("axes")
    where = f"{name}:{'.'.join(map(str, path))} shape {var.get_value().shape}"
    assert isinstance(axes, tuple), f"{where} has no `axes` metadata tuple"
    assert len(axes) == var.get_value().ndim, f"{where}: axes {axes} do not match the rank"
    assert set(axes) <= ALLOWED_AXES, f"{where}: unknown logical axis in {axes}"


@pytest.mark.parametrize("name", ["mmdit", "s3dit", "rqa", "mllm", "vae"])
def test_large_matrices_are_sharded_on_1_4_2(full_states, name):
  """Every matrix of ≥ 1M elements is split over the mesh, and the per-device share of all weights is small."""
  mesh = jax.make_mesh(
      (1, 4, 2), parallel.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:8]
  )
  state = full_states[name]
  shardings = parallel.param_shardings(state, mesh, DEFAULT_RULES)
  leaves = jax.tree_util.tree_leaves(nnx.to_pure_dict(state))
  shards = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  total = per_device = 0
  both = 0
  for x, s in zip(leaves, shards):
    size = math.prod(x.shape)
    local = math.prod(s.shard_shape(x.shape))
    total, per_device = total + size, per_device + local
    if x.ndim >= 2 and size >= 2**20:
      assert local < size, f"{name}: a {x.shape} matrix is replicated under {s.spec}"
      both += local * 8 == size
  assert per_device <= 0.3 * total, f"{name}: each device holds {per_device / total:.0%} of the weights"
  if name in ("mmdit", "s3dit", "mllm", "rqa"):
    assert both > 0, f"{name}: no matrix uses both the fsdp and the tensor axis"


# ---------------------------------------------------------------- one run per mesh, compiled once


def small_config(**overrides):
  """The tiny config with one block per stack (compile time), batch 8, no warm-up."""
  c = tiny_config(train__warmup_steps=0, train__num_steps=NUM_STEPS, **overrides)
  c.model.dit.arch.num_layers = 1
  c.model.dit.arch.num_single_layers = 1
  c.model.mllm.arch.text["num_hidden_layers"] = 1
  c.model.mllm.arch.vision["num_hidden_layers"] = 1
  return c


# Unoptimised CPU code generation: a third of the compile time, same arithmetic (every run here uses it).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_COMPILED: dict = {}


def compiled_step(run, state, frozen, batch):
  """run.train_step compiled once per run (with FAST options) for these argument shardings."""
  if id(run) not in _COMPILED:
    _COMPILED[id(run)] = (run, run.train_step.lower(state, frozen, batch).compile(compiler_options=FAST))
  return _COMPILED[id(run)][1]


class Ref:
  """The 1-device reference: host copies of the initial state, frozen weights and the first batches.

  Weights are created eagerly (no init compilation) with the seeds `Run.init_state` / `load_frozen_weights` use.
  """

  def __init__(self, tmp):
    c = small_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    self.run = builder.build(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:1]), load_frozen=False)
    gen = factory.make_generator(c, nnx.Rngs(c.seed), self.run.mcfg)
    params = nnx.to_pure_dict(nnx.state(gen, nnx.Param))
    state = state_lib.create(
        params, self.run.optimizer, ema=c.train.ema_decay > 0, rng=jax.random.fold_in(jax.random.key(c.seed), 1)
    )
    self.state0 = jax.device_get(state)
    mllm = factory.make_mllm(c, nnx.Rngs(c.seed + 7919), self.run.mcfg)
    self.frozen = jax.device_get({"mllm": nnx.to_pure_dict(nnx.state(mllm, nnx.Param)), "ae": {}})
    it, _ = loop.make_data_iter(self.run, str(tmp))
    self.batches = [loop.model_batch(next(it), False) for _ in range(NUM_STEPS)]
    self.losses = train_losses(self.run, self.state0, self.frozen, self.batches)[0]


def train_losses(run, state, frozen, batches):
  """(losses, final state) of the compiled step over host batches, starting from a host or device state."""
  state = jax.device_put(jax.tree_util.tree_map(lambda x: x.copy(), state), run.state_shardings)  # step donates
  frozen = jax.device_put(frozen, run.frozen_shardings)
  losses = []
  for b in batches:
    gb = parallel.global_batch(b, run.mesh)
    state, m = compiled_step(run, state, frozen, gb)(state, frozen, gb)
    losses.append(float(m["loss"]))
  return losses, state


_RUNS: dict = {}


def mesh_run(shape):
  """The small run on an 8-device mesh `shape`, built once per module."""
  if shape not in _RUNS:
    c = small_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
    _RUNS[shape] = builder.build(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:8]), load_frozen=False)
  return _RUNS[shape]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  return Ref(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_same_losses_on_8_devices(ref, shape):
  run = mesh_run(shape)
  assert dict(run.mesh.shape) == dict(zip(parallel.MESH_AXES, shape))
  losses, state = train_losses(run, ref.state0, ref.frozen, ref.batches)
  np.testing.assert_allclose(losses, ref.losses, rtol=RTOL, atol=0)
  # the state really is distributed: a sharded mesh axis splits some parameter
  if shape[1] > 1 or shape[2] > 1:
    specs = {leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(state.params)}
    assert any(any(ax is not None for ax in spec) for spec in specs)


@pytest.mark.slow
def test_losses_differ_when_the_batch_differs(ref):
  """The equality above can fail: one changed example changes the loss beyond the tolerance."""
  batches = [dict(b) for b in ref.batches[:1]]
  batches[0]["pixels"] = batches[0]["pixels"].copy()
  batches[0]["pixels"][0] *= 0.5  # (not a sign flip: with x-prediction at init the loss is even in x)
  losses, _ = train_losses(ref.run, ref.state0, ref.frozen, batches)
  assert abs(losses[0] - ref.losses[0]) > 10 * RTOL * abs(ref.losses[0])


@pytest.mark.slow
def test_checkpoint_reshards_from_2_2_2_to_1_4_2(ref, tmp_path):
  """Two steps on (2,2,2), checkpoint (state + data iterator), restore onto (1,4,2), one more step: the loss and
  the next batch equal the uninterrupted run's."""
  src, dst = mesh_run((2, 2, 2)), mesh_run((1, 4, 2))
  it, _ = loop.make_data_iter(src, str(tmp_path))
  batches = [loop.model_batch(next(it), False) for _ in range(2)]
  _, state = train_losses(src, ref.state0, ref.frozen, batches)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "w"), async_save=False)
  ckpt.save(2, state, it, {"note": "test"}, force=True)
  ckpt.close()

  fresh, _ = loop.make_data_iter(dst, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "w"), async_save=False)
  restored, step = ckpt.restore(checkpoint.abstract_with_shardings(dst.abstract_state, dst.state_shardings), fresh)
  ckpt.close()
  assert step == 2 and int(restored.step) == 2
  got = jax.tree_util.tree_leaves(restored.params)
  want = jax.tree_util.tree_leaves(dst.state_shardings.params, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  assert all(a.sharding == s for a, s in zip(got, want))  # restored directly onto the target mesh
  nxt = loop.model_batch(next(fresh), False)
  np.testing.assert_array_equal(nxt["pixels"], ref.batches[2]["pixels"])  # the iterator continues at batch 3
  frozen = jax.device_put(ref.frozen, dst.frozen_shardings)
  gb = parallel.global_batch(nxt, dst.mesh)
  _, m = compiled_step(dst, restored, frozen, gb)(restored, frozen, gb)
  np.testing.assert_allclose(float(m["loss"]), ref.losses[2], rtol=RTOL)


# ---------------------------------------------------------------- remat policies

_BASE: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_policy_keeps_loss_and_grads(ref, policy):
  """DiT blocks and LLM layers rematerialised: same loss and gradients as without remat (one device)."""
  c = small_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  c.model.dit.arch.remat = policy
  c.model.mllm.remat = policy
  run = builder.build(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:1]), load_frozen=False)
  batch = {k: jnp.asarray(v) for k, v in ref.batches[0].items()}
  rng = jax.random.key(3)

  def loss_and_grad(statics):
    fn = lambda p: step_lib.compute_loss(statics, p, ref.frozen, batch, rng)[0]  # noqa: E731
    params = jax.tree_util.tree_map(jnp.asarray, ref.state0.params)
    return jax.jit(jax.value_and_grad(fn)).lower(params).compile(compiler_options=FAST)(params)

  if "none" not in _BASE:
    _BASE["none"] = loss_and_grad(ref.run.statics)
  base_loss, base_grads = _BASE["none"]
  loss, grads = loss_and_grad(run.statics)
  np.testing.assert_allclose(float(loss), float(base_loss), rtol=RTOL)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(base_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
