"""MM-DiT (models/mmdit.py), RoPE (models/rope.py), latent packing (models/latents.py) and the diffusers
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
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from diffusers.models.transformers.transformer_z_image import RopeEmbedder
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from flax import nnx

from iomm_jax.models import keymap, mmdit_keys
from iomm_jax.models import latents, layers, rope
from iomm_jax.models.mmdit import MMDiT, MMDiTConfig


def _close(ours, theirs, tol=1e-4):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs))), tol * max(1.0, float(np.max(np.abs(theirs))))


def assert_close(ours, theirs, tol=1e-4):
  diff, bound = _close(ours, theirs, tol)
  assert diff <= bound, f"max|ours-theirs|={diff:.3g} > {bound:.3g}"


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
  diff, bound = _close(ours, theirs)
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


# ---------------------------------------------------------------- latents


@pytest.mark.parametrize("h,w,c", [(4, 6, 3), (8, 2, 16)])
def test_pack_unpack_match_diffusers(h, w, c):
  x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
  theirs = FluxPipeline._pack_latents(x, 2, c, h, w).numpy()
  ours = latents.pack(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_array_equal(np.asarray(ours), theirs)
  back = FluxPipeline._unpack_latents(torch.from_numpy(theirs), h * 8, w * 8, 8).numpy()
  np.testing.assert_array_equal(np.asarray(latents.unpack(ours, h, w, c)), back.transpose(0, 2, 3, 1))
  ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32).numpy()
  np.testing.assert_array_equal(np.asarray(latents.image_ids(h // 2, w // 2)), ids)
  np.testing.assert_array_equal(np.asarray(latents.text_ids(5)), np.zeros((5, 3), np.float32))


def test_pack_rejects_odd_sizes():
  with pytest.raises(ValueError, match="even"):
    latents.pack(jnp.zeros((1, 5, 4, 2)))
  with pytest.raises(ValueError, match="do not fit"):
    latents.unpack(jnp.zeros((1, 6, 8)), 4, 4, 2)


# ---------------------------------------------------------------- RoPE


def _ids(n=11, seed=0):
  return np.random.default_rng(seed).integers(0, 64, (n, 3)).astype(np.float32)


def test_rope_matches_flux_pos_embed_and_apply_rotary_emb():
  ids, dims = _ids(), (4, 6, 6)
  cos_t, sin_t = FluxPosEmbed(10000, list(dims))(torch.from_numpy(ids))
  cos, sin = rope.rope_frequencies(jnp.asarray(ids), dims, 10000.0)
  assert_close(cos, cos_t.numpy(), 1e-5)
  assert_close(sin, sin_t.numpy(), 1e-5)
  x = np.random.default_rng(1).standard_normal((2, 11, 3, 16)).astype(np.float32)
  theirs = apply_rotary_emb(torch.from_numpy(x), (cos_t, sin_t), sequence_dim=1).numpy()
  assert_close(rope.apply_rope(jnp.asarray(x), cos, sin), theirs, 1e-5)


def test_rope_half_layout_matches_diffusers_unbind_minus_2():
  pos = np.arange(9, dtype=np.float32)
  cos_t, sin_t = get_1d_rotary_pos_embed(
      16, torch.from_numpy(pos), 10000.0, use_real=True, repeat_interleave_real=False
  )
  cos, sin = rope.rope_frequencies(jnp.asarray(pos)[:, None], (16,), 10000.0, layout="half")
  assert_close(cos, cos_t.numpy(), 1e-5)
  x = np.random.default_rng(2).standard_normal((1, 9, 2, 16)).astype(np.float32)
  theirs = apply_rotary_emb(torch.from_numpy(x), (cos_t, sin_t), use_real_unbind_dim=-2, sequence_dim=1).numpy()
  assert_close(rope.apply_rope(jnp.asarray(x), cos, sin, layout="half"), theirs, 1e-5)


def test_rope_complex_matches_z_image():
  ids, dims = _ids().astype(np.int64), (4, 6, 6)
  theirs = RopeEmbedder(theta=256.0, axes_dims=list(dims), axes_lens=[64, 64, 64])(torch.from_numpy(ids))
  ours = rope.rope_frequencies_complex(jnp.asarray(ids), dims, 256.0)
  assert_close(np.real(ours), theirs.real.numpy(), 1e-5)
  assert_close(np.imag(ours), theirs.imag.numpy(), 1e-5)
  x = np.random.default_rng(3).standard_normal((2, 11, 3, 16)).astype(np.float32)
  xc = torch.view_as_complex(torch.from_numpy(x).reshape(2, 11, 3, 8, 2))  # Z-Image's own formula
  ref = torch.view_as_real(xc * theirs.unsqueeze(1)).flatten(3).numpy()
  assert_close(rope.apply_rope_complex(jnp.asarray(x), ours), ref, 1e-5)
  # ... and it is the interleaved real rotation.
  cos, sin = rope.rope_frequencies(jnp.asarray(ids), dims, 256.0)
  assert_close(rope.apply_rope(jnp.asarray(x), cos, sin), ref, 1e-5)


def test_rope_errors():
  with pytest.raises(ValueError, match="one dimension per axis"):
    rope.rope_frequencies(jnp.zeros((3, 2)), (4, 4, 4))
  with pytest.raises(ValueError, match="even"):
    rope.rope_frequencies(jnp.zeros((3, 3)), (4, 3, 5))


def test_rope_tables_are_constants_of_the_traced_program():
  """With ids from `latents` (host arrays, known at trace time) MMDiT builds its RoPE cos/sin tables eagerly, so
  the program holds them as constants (XLA:CPU would otherwise evaluate cos/sin per rotated element); traced ids
  still work. The only cos left in the program is the timestep embedding's."""
  cfg = MMDiTConfig(
      in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
      joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
  )  # fmt: skip
  dit = MMDiT(cfg, rngs=nnx.Rngs(0))
  x, cond, t = jnp.ones((2, 4, 8)), jnp.ones((2, 3, 16)), jnp.full((2,), 0.5)
  img_ids, txt_ids = latents.image_ids(2, 2), latents.text_ids(3)
  assert isinstance(img_ids, np.ndarray) and isinstance(txt_ids, np.ndarray)

  def cos_count(fn, *args):
    return sum(e.primitive.name == "cos" for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns)

  assert cos_count(lambda x: dit(x, cond, cond.mean(1), t, img_ids, txt_ids), x) == 1
  traced = lambda x, i, c: dit(x, cond, cond.mean(1), t, i, c)  # noqa: E731
  assert cos_count(traced, x, img_ids, txt_ids) == 2
  np.testing.assert_allclose(
      np.asarray(jax.jit(traced)(x, img_ids, txt_ids)), np.asarray(dit(x, cond, cond.mean(1), t, img_ids, txt_ids)),
      atol=1e-6,
  )  # fmt: skip
