"""Scan-over-layers (`models/layer_stack.py`): the same output and gradients as the unrolled blocks, for the MM-DiT,
the S3-DiT and the Qwen2 LLM, with every remat policy; one `scan` per block stack in the traced program; and the
whole IOMM loss of the tiny config unchanged when the DiT and the LLM are scanned and rematerialised.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import image_only_batch, tiny_config
from iomm_jax import parallel
from iomm_jax.models import layer_stack, layers
from iomm_jax.models.mmdit import MMDiT, MMDiTConfig
from iomm_jax.models.qwen2 import Qwen2Config, Qwen2Model
from iomm_jax.models.s3dit import S3DiT, S3DiTConfig
from iomm_jax.train import builder, step as step_lib

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
MODES = [("none", True), ("full", True), ("dots_saveable", True)]  # each against unrolled without remat


def _primitives(fn, *args):
  """Names of the top-level primitives of fn's jaxpr."""
  return [e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


def _value_and_grad(make, cfg, loss_of_model):
  """(loss, grads, primitives) of loss_of_model(model) w.r.t. the Params of `make(cfg)` (seeded init)."""
  graphdef, params, rest = nnx.split(make(cfg), nnx.Param, ...)
  loss = lambda p: loss_of_model(nnx.merge(graphdef, p, rest))  # noqa: E731
  value, grads = jax.jit(jax.value_and_grad(loss)).lower(params).compile(FAST)(params)
  return value, grads, _primitives(loss, params)


def _assert_same(base, other, what):
  (l0, g0, _), (l1, g1, _) = base, other
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6, err_msg=what)
  leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(leaves0) == len(leaves1)
  assert max(float(jnp.max(jnp.abs(g))) for g in leaves0) > 0
  for a, b in zip(leaves0, leaves1):
    np.testing.assert_allclose(
        np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(a)))), err_msg=what
    )


# ---------------------------------------------------------------- MM-DiT

MMDIT = MMDiTConfig(
    in_channels=8,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
    zero_init=False,
)


def _mmdit_loss(model):
  rng = np.random.default_rng(0)
  h, w, lc = 4, 6, 5
  x = jnp.asarray(rng.normal(size=(2, h * w, 8)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(2, lc, 24)), jnp.float32)
  img_ids = jnp.asarray(
      np.stack(np.meshgrid(np.zeros(1), np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 3), jnp.float32
  )
  mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
  out = model(x, ctx, ctx.mean(1), jnp.asarray([0.3, 0.8]), img_ids, jnp.zeros((lc, 3)), mask)
  return jnp.mean(out**2)


@pytest.fixture(scope="module")
def mmdit_base():
  return _value_and_grad(lambda c: MMDiT(c, rngs=nnx.Rngs(0)), MMDIT, _mmdit_loss)


@pytest.mark.slow
@pytest.mark.parametrize("remat,scan", MODES)
def test_mmdit_scan_equals_unrolled(mmdit_base, remat, scan):
  cfg = dataclasses.replace(MMDIT, remat=remat, scan_layers=scan)
  result = _value_and_grad(lambda c: MMDiT(c, rngs=nnx.Rngs(0)), cfg, _mmdit_loss)
  _assert_same(mmdit_base, result, f"remat={remat} scan={scan}")
  assert mmdit_base[2].count("scan") == 0
  assert result[2].count("scan") == 2  # one per stack: double-stream and single-stream blocks


# ---------------------------------------------------------------- S3-DiT

S3DIT = S3DiTConfig(
    in_channels=4,
    dim=32,
    n_layers=3,
    n_refiner_layers=2,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=8,
    axes_dims=(4, 6, 6),
    axes_lens=(128, 16, 16),
)


def _s3dit_loss(model):
  rng = np.random.default_rng(1)
  lat = jnp.asarray(rng.normal(size=(2, 4, 6, 4)), jnp.float32)
  cap = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
  return jnp.mean(model(lat, jnp.asarray([0.2, 0.7]), cap, mask) ** 2)


@pytest.mark.slow
def test_s3dit_scan_equals_unrolled():
  make = lambda c: S3DiT(c, rngs=nnx.Rngs(0))  # noqa: E731
  base = _value_and_grad(make, S3DIT, _s3dit_loss)
  scanned = _value_and_grad(make, dataclasses.replace(S3DIT, scan_layers=True, remat="full"), _s3dit_loss)
  _assert_same(base, scanned, "s3dit scan+full")
  assert base[2].count("scan") == 0
  assert scanned[2].count("scan") == 3  # noise refiner, context refiner, main layers


# ---------------------------------------------------------------- Qwen2 (the frozen LLM; gradients reach its input)

QWEN = Qwen2Config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_qwen2_scan_equals_unrolled(remat):
  rng = np.random.default_rng(2)
  embeds = jnp.asarray(rng.normal(size=(2, 7, 32)), jnp.float32)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7], bool)  # left padding, as the IOMM templates
  # The explicit reference attention: what is compared is scan vs unrolled, at 1e-6 of a gradient of ≈1e-8; the
  # fused 'auto' path's own rounding on the left-padded rows is larger than that (test_attention covers it).
  models = {
      scan: Qwen2Model(QWEN, remat=remat, scan_layers=scan, attention_impl="xla", rngs=nnx.Rngs(0))
      for scan in (False, True)
  }

  def grad_to_input(model):
    return jax.jit(jax.value_and_grad(lambda e: jnp.mean(model(e, mask)[mask] ** 2)))(embeds)

  (l0, g0), (l1, g1) = grad_to_input(models[False]), grad_to_input(models[True])
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(g0))))
  assert float(jnp.max(jnp.abs(g0))) > 0
  assert "scan" in _primitives(lambda e: models[True](e, mask), embeds)


def test_scan_rejects_blocks_of_different_structure():
  blocks = nnx.List([layers.Linear(4, 4, rngs=nnx.Rngs(0)), layers.Linear(4, 4, use_bias=False, rngs=nnx.Rngs(1))])
  call = lambda block, x: block(x)  # noqa: E731
  x = jnp.ones((1, 4))
  assert layer_stack.run_blocks(blocks, x, call=call).shape == (1, 4)  # unrolled: fine
  with pytest.raises(ValueError, match="block 1 differs"):
    layer_stack.run_blocks(blocks, x, call=call, scan=True)
  with pytest.raises(ValueError, match="remat"):
    layer_stack.run_blocks(blocks, x, call=call, remat="some")


def test_scan_changes_the_result_when_a_layer_is_skipped():
  """The equality above can fail: scanning only the first two of three layers changes the output."""
  model = Qwen2Model(QWEN, scan_layers=True, rngs=nnx.Rngs(0))
  embeds = jnp.asarray(np.random.default_rng(3).normal(size=(1, 5, 32)), jnp.float32)
  full = model(embeds)
  model.layers = nnx.List(list(model.layers)[:2])
  assert float(jnp.max(jnp.abs(model(embeds) - full))) > 1e-3


# ---------------------------------------------------------------- the whole IOMM loss (tiny config)


@pytest.mark.slow
def test_tiny_loss_and_grads_same_with_scan_and_remat():
  """The tiny config's IOMM loss and gradients: DiT and LLM unrolled without remat == scanned with remat 'full'."""
  results = []
  for scan, remat in ((False, "none"), (True, "full")):
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.model.dit.arch.scan_layers, c.model.dit.arch.remat = scan, remat
    c.model.mllm.scan_layers, c.model.mllm.remat = scan, remat
    run = builder.build(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:1]), load_frozen=False)
    if not results:
      state = run.init_state()
      frozen = builder.load_frozen_weights(c, run)
      batch = image_only_batch(c, 4, seed=4)
    fn = lambda p, statics=run.statics: step_lib.compute_loss(statics, p, frozen, batch, jax.random.key(5))[0]  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(fn)).lower(state.params).compile(FAST)(state.params)
    results.append((value, grads, str(jax.make_jaxpr(fn)(state.params))))
  _assert_same(results[0], results[1], "tiny IOMM loss")
  assert " scan[" not in results[0][2] and results[1][2].count(" scan[") >= 3  # DiT: 2 stacks, LLM: 1


def test_gradient_fence_passes_values_and_gradients_unchanged():
  """The fence is the identity both ways (its predicate's draw is not 0 on this backend), integer leaves too."""
  x = jnp.linspace(-2.0, 3.0, 12).reshape(3, 4)
  n = jnp.arange(3)
  fenced = lambda x: jnp.sum(jnp.sin(layer_stack.gradient_fence({"x": x * 2.0, "n": n})["x"]) ** 2)  # noqa: E731
  plain = lambda x: jnp.sum(jnp.sin(x * 2.0) ** 2)  # noqa: E731
  np.testing.assert_array_equal(jax.jit(fenced)(x), jax.jit(plain)(x))
  np.testing.assert_array_equal(jax.jit(jax.grad(fenced))(x), jax.jit(jax.grad(plain))(x))
  assert layer_stack.gradient_fence({"n": n})["n"] is n


def _unrolled_mmdit_grad_hlo(platform: str) -> str:
  cfg = MMDiTConfig(
      in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
      joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
  )  # fmt: skip
  graphdef, params = nnx.split(MMDiT(cfg, rngs=nnx.Rngs(0)))
  x, cond = jnp.ones((2, 4, 8)), jnp.ones((2, 3, 16))
  ids = jnp.zeros((4, 3)), jnp.zeros((3, 3))

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p)(x, cond, cond.mean(1), jnp.full((2,), 0.5), *ids) ** 2)

  lowered = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=(platform,))
  return lowered.compile().as_text() if platform == "cpu" else lowered.as_text()


def test_gradient_fence_survives_xla_cpu_between_unrolled_blocks_and_vanishes_elsewhere():
  """Each unrolled block's input is fenced: the CPU program keeps one conditional per fenced carry array (2 per
  MM-DiT block: text and image streams), which XLA would drop if it could see through it; a CUDA lowering draws
  no predicate (only the constant platform switch of `platform_dependent` remains, which XLA folds)."""
  cpu = _unrolled_mmdit_grad_hlo("cpu")
  assert cpu.count(" conditional(") == 2 * 4, cpu.count(" conditional(")
  assert "rng_bit_generator" not in _unrolled_mmdit_grad_hlo("cuda")
