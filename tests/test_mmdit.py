"""MM-DiT (models/mmdit.py) and the diffusers
key table (convert/mmdit_keys.py), against diffusers.FluxTransformer2DModel built tiny and random here."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from flax import nnx

from helpers import assert_close, diff_and_bound

from iomm_jax.models import keymap, mmdit_keys
from iomm_jax.models import latents, layers
from iomm_jax.models.mmdit import MMDiT, MMDiTConfig

# ---------------------------------------------------------------- tiny random configs and their torch twins

CONFIGS = {
    # (config, latent grid in tokens (h, w), text length, random txt_ids)
    "2double_1single": (
        MMDiTConfig(
            in_channels=16,
            num_layers=2,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            pooled_projection_dim=20,
            axes_dims_rope=(4, 6, 6),
        ),
        (3, 5),
        7,
        False,
    ),
    "0double_2single": (
        MMDiTConfig(
            in_channels=8,
            out_channels=12,
            num_layers=0,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=3,
            joint_attention_dim=16,
            pooled_projection_dim=12,
            axes_dims_rope=(2, 2, 4),
        ),
        (4, 2),
        5,
        True,
    ),
    "1double_0single": (
        MMDiTConfig(
            in_channels=12,
            num_layers=1,
            num_single_layers=0,
            attention_head_dim=12,
            num_attention_heads=4,
            joint_attention_dim=20,
            pooled_projection_dim=20,
            axes_dims_rope=(4, 4, 4),
        ),
        (2, 6),
        4,
        False,
    ),
}


def torch_model(cfg: MMDiTConfig, seed: int = 0) -> FluxTransformer2DModel:
  """The diffusers reference with every parameter (norm weights included) perturbed away from its init."""
  torch.manual_seed(seed)
  model = FluxTransformer2DModel(**cfg.to_diffusers()).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def torch_sd(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def our_model(cfg: MMDiTConfig, sd: dict, table=mmdit_keys.KEY_TABLE, **kw) -> MMDiT:
  return mmdit_keys.model_from_torch(cfg, sd, table=table, **kw)


def make_inputs(cfg: MMDiTConfig, grid, lc, random_txt_ids, batch=2, seed=1):
  rng = np.random.default_rng(seed)
  n = grid[0] * grid[1]
  txt_ids = rng.integers(0, 5, (lc, 3)).astype(np.float32) if random_txt_ids else np.asarray(latents.text_ids(lc))
  return dict(
      hidden_states=rng.standard_normal((batch, n, cfg.in_channels)).astype(np.float32),
      encoder_hidden_states=rng.standard_normal((batch, lc, cfg.joint_attention_dim)).astype(np.float32),
      pooled_projections=rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32),
      timestep=rng.uniform(0, 1, (batch,)).astype(np.float32),
      img_ids=np.asarray(latents.image_ids(*grid)),
      txt_ids=txt_ids,
  )


def torch_forward(model, inputs, attention_mask=None):
  kw = {} if attention_mask is None else dict(joint_attention_kwargs={"attention_mask": attention_mask})
  with torch.no_grad():
    return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False, **kw)[0].numpy()


# The programs here are tiny; XLA's backend optimisation only costs compile time (halves it on CPU).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, inputs, mask):
  return nnx.merge(graphdef, state)(**inputs, encoder_attention_mask=mask)


def jax_forward(model, inputs, mask=None):
  """Jitted forward; compiled once per (model structure, input shapes), shared by all tests."""
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, {k: jnp.asarray(v) for k, v in inputs.items()}, mask))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
  cfg, grid, lc, rand_ids = CONFIGS[request.param]
  tm = torch_model(cfg)
  inputs = make_inputs(cfg, grid, lc, rand_ids)
  return cfg, tm, torch_sd(tm), inputs, torch_forward(tm, inputs)


# ---------------------------------------------------------------- parity


def test_parity_with_diffusers(case):
  cfg, _, sd, inputs, theirs = case
  ours = jax_forward(our_model(cfg, sd), inputs)
  assert ours.shape == (2, inputs["hidden_states"].shape[1], cfg.output_channels)
  assert_close(ours, theirs)


def test_broken_mapping_fails_parity(case):
  cfg, _, sd, inputs, theirs = case
  # Swap two same-shaped weights of the first block: the model still loads but must no longer match.
  prefix = "transformer_blocks.0" if cfg.num_layers else "single_transformer_blocks.0"
  a, b = f"{prefix}.attn.to_q", f"{prefix}.attn.to_k"
  broken = keymap.KeyTable(
      "mmdit-broken",
      rules=[
          keymap.Rule(re.escape(f"{a}.kernel"), f"{b}.weight", "linear"),
          keymap.Rule(re.escape(f"{b}.kernel"), f"{a}.weight", "linear"),
      ],
  )
  ours = jax_forward(our_model(cfg, sd, broken), inputs)
  diff, bound = diff_and_bound(ours, theirs)
  assert diff > 100 * bound, f"a swapped to_q/to_k still matches diffusers (diff {diff:.3g})"


def test_round_trip_bit_exact(case):
  cfg, _, sd, _, _ = case
  back = mmdit_keys.torch_state(our_model(cfg, sd))
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_missing_and_unexpected_keys_raise():
  cfg = CONFIGS["1double_0single"][0]
  sd = torch_sd(torch_model(cfg))
  sd["transformer_blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  del sd["proj_out.bias"]
  with pytest.raises(keymap.KeyMismatchError, match="proj_out.bias"):
    our_model(cfg, sd)
  # A config with a different depth than the checkpoint is named as such.
  deeper = dataclasses.replace(cfg, num_layers=2)
  with pytest.raises(keymap.KeyMismatchError, match="transformer_blocks.1"):
    our_model(deeper, torch_sd(torch_model(cfg)))


# ---------------------------------------------------------------- text padding mask (our extension)


def test_mask_excludes_padded_text_tokens():
  cfg, grid, lc, rand_ids = CONFIGS["2double_1single"]
  tm = torch_model(cfg)
  model = our_model(cfg, torch_sd(tm))
  inputs = make_inputs(cfg, grid, lc, rand_ids)
  mask = np.ones((2, lc), bool)
  mask[0, 4:] = False
  mask[1, 6:] = False
  out = jax_forward(model, inputs, jnp.asarray(mask))
  # An all-True mask is the same as no mask.
  assert_close(jax_forward(model, inputs, jnp.ones((2, lc), bool)), jax_forward(model, inputs), 1e-6)
  # New values at padded positions change nothing.
  changed = dict(inputs)
  ehs = inputs["encoder_hidden_states"].copy()
  ehs[~mask] = 100.0 * np.random.default_rng(5).standard_normal(ehs[~mask].shape)
  changed["encoder_hidden_states"] = ehs
  np.testing.assert_allclose(jax_forward(model, changed, jnp.asarray(mask)), out, rtol=0, atol=1e-5)
  # ... while they do without the mask (the test can fail).
  assert np.max(np.abs(jax_forward(model, changed) - jax_forward(model, inputs))) > 1e-2
  # Same as diffusers given the equivalent joint key mask.
  n = inputs["hidden_states"].shape[1]
  joint = torch.from_numpy(np.concatenate([mask, np.ones((2, n), bool)], axis=1))[:, None, None, :]
  assert_close(out, torch_forward(tm, inputs, joint))


# ---------------------------------------------------------------- remat, dtype, init

SMALL = dataclasses.replace(CONFIGS["2double_1single"][0], num_layers=1, num_single_layers=1, zero_init=False)


def _remat_eqns(cfg, inputs):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0))))
  jaxpr = jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(**inputs))(state)
  return [e for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("remat")]


def test_remat_wraps_every_block_with_its_policy():
  inputs = {k: jnp.asarray(v) for k, v in make_inputs(SMALL, (2, 3), 3, False).items()}
  assert not _remat_eqns(SMALL, inputs)
  for name, policy in (
      ("full", jax.checkpoint_policies.nothing_saveable),
      ("dots_saveable", jax.checkpoint_policies.dots_saveable),
  ):
    eqns = _remat_eqns(dataclasses.replace(SMALL, remat=name), inputs)
    assert len(eqns) == SMALL.num_layers + SMALL.num_single_layers
    assert all(e.params["policy"] is policy for e in eqns), name


@pytest.mark.slow
def test_remat_full_same_output_and_grad():
  cfg, grid, lc, rand_ids = SMALL, (2, 3), 3, False
  sd = torch_sd(torch_model(cfg))
  inputs = {k: jnp.asarray(v) for k, v in make_inputs(cfg, grid, lc, rand_ids).items()}
  results = {}
  for policy in ("none", "full"):
    graphdef, params, rest = nnx.split(our_model(dataclasses.replace(cfg, remat=policy), sd), nnx.Param, ...)

    def loss(params, graphdef=graphdef, rest=rest):
      out = nnx.merge(graphdef, params, rest)(**inputs)
      return jnp.mean(out**2), out

    (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(params)
    results[policy] = (out, jax.tree_util.tree_leaves(grad))
  ref_out, ref_grad = results["none"]
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in ref_grad)
  out, grad = results["full"]
  assert_close(out, ref_out, 1e-6)
  for g, r in zip(grad, ref_grad):
    assert_close(g, r, 1e-5)


def test_bf16_compute_close_to_fp32():
  cfg, grid, lc, rand_ids = CONFIGS["2double_1single"]
  tm = torch_model(cfg)
  inputs = make_inputs(cfg, grid, lc, rand_ids)
  sd, theirs = torch_sd(tm), torch_forward(tm, inputs)
  ours = jax_forward(our_model(cfg, sd, dtype=jnp.bfloat16), inputs)
  assert ours.dtype == np.float32
  assert_close(ours, theirs, 5e-2)


@pytest.mark.slow
def test_zero_init_gives_zero_output_and_nonzero_grad():
  cfg = dataclasses.replace(SMALL, zero_init=True)
  create = lambda: MMDiT(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  # Initialise in one jitted program: eager init compiles the RNG once per parameter shape (slow on CPU).
  model = nnx.merge(
      nnx.graphdef(nnx.eval_shape(create)), jax.jit(lambda: nnx.state(create()), compiler_options=FAST_COMPILE)()
  )
  inputs = {k: jnp.asarray(v) for k, v in make_inputs(cfg, (2, 3), 3, False).items()}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    out = nnx.merge(graphdef, params, rest)(**inputs)
    return jnp.mean((out - 1.0) ** 2), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(params)
  assert float(jnp.max(jnp.abs(out))) == 0.0
  assert float(jnp.max(jnp.abs(grads["proj_out"]["kernel"][...]))) > 0
  # adaLN-Zero: only modulation and output projections start at zero.
  assert float(jnp.max(jnp.abs(model.transformer_blocks[0].attn.to_q.kernel[...]))) > 0
  assert float(jnp.max(jnp.abs(model.transformer_blocks[0].norm1.linear.kernel[...]))) == 0


def test_logical_axes_are_from_the_allowed_set():
  allowed = {"embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", None}
  model = nnx.eval_shape(lambda: MMDiT(CONFIGS["2double_1single"][0], rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata()["axes"]
    assert len(axes) == len(var.get_value().shape) and set(axes) <= allowed, (path, axes)
    named = [a for a in axes if a is not None]
    assert len(named) == len(set(named)), (path, axes)


# ---------------------------------------------------------------- config


def test_config_round_trip_and_errors():
  cfg = CONFIGS["0double_2single"][0]
  d = cfg.to_diffusers()
  assert FluxTransformer2DModel(**d).config.num_single_layers == 2
  full = dict(FluxTransformer2DModel(**d).config)
  assert mmdit_keys.config_from_torch(full) == cfg
  assert MMDiTConfig.from_diffusers(full, remat="full").remat == "full"
  with pytest.raises(ValueError, match="guidance_embeds"):
    MMDiTConfig(guidance_embeds=True)
  with pytest.raises(ValueError, match="axes_dims_rope"):
    MMDiTConfig(axes_dims_rope=(16, 56, 48))
  with pytest.raises(ValueError, match="remat"):
    MMDiTConfig(remat="some")
  with pytest.raises(ValueError, match="unknown diffusers config keys"):
    MMDiTConfig.from_diffusers({**d, "num_blocks": 3})
  with pytest.raises(ValueError, match="rope_theta"):
    MMDiTConfig(rope_theta=256.0).to_diffusers()


@pytest.mark.parametrize("heads,expected", [(12, 1.6e9), (16, 2.7e9)])
def test_full_size_parameter_count(heads, expected):
  cfg = MMDiTConfig(num_attention_heads=heads)  # IOMM-B (1536 wide) / IOMM-L (2048 wide)
  abstract = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))
  n = layers.count_params(nnx.state(abstract, nnx.Param))
  assert abs(n - expected) <= 0.05 * expected, n
  with torch.device("meta"):  # diffusers agrees on the count, still without allocating
    assert n == sum(p.numel() for p in FluxTransformer2DModel(**cfg.to_diffusers()).parameters())
