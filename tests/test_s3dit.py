"""S3-DiT (Z-Image) parity against diffusers.ZImageTransformer2DModel, conversion and remat.

Identity under test (see iomm_jax/models/s3dit.py): ours(x_t, t, c) == −diffusers([x_t], 1 − t, [c[mask]]).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from iomm_jax.models import keymap
from iomm_jax.models.s3dit_keys import KEY_TABLE, config_from_torch, config_to_torch
from iomm_jax.models.layers import count_params
from iomm_jax.models.s3dit import S3DiT, S3DiTConfig

diffusers = pytest.importorskip("diffusers")

# A: equal-length captions (7 → padded to 32), 15 image tokens (→ 32), QK-norm, 2 main layers.
CFG_A = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=4,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=24,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[128, 32, 32],
)
# B: two patch sizes, no QK-norm, other eps/θ/t_scale, 2 refiner layers, ragged captions.
CFG_B = dict(
    all_patch_size=[2, 1],
    all_f_patch_size=[1, 1],
    in_channels=3,
    dim=96,
    n_layers=1,
    n_refiner_layers=2,
    n_heads=3,
    n_kv_heads=3,
    norm_eps=1e-6,
    qk_norm=False,
    cap_feat_dim=40,
    rope_theta=10000.0,
    t_scale=500.0,
    axes_dims=[8, 12, 12],
    axes_lens=[160, 16, 16],
)


def _torch_model(kw, seed=0):
  """A tiny diffusers Z-Image with every parameter random (norm weights and pad tokens included)."""
  torch.manual_seed(seed)
  model = diffusers.ZImageTransformer2DModel(**kw).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("pad_token"):
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.mul_(1.0 + 0.3 * torch.randn_like(p))
  return model


def _torch_state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _ours(cfg: S3DiTConfig, sd, table=KEY_TABLE):
  """Our model with the torch state dict `sd` loaded through `table` (built abstractly: no init compute)."""
  model = nnx.eval_shape(lambda: S3DiT(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  shapes = {k: tuple(v.shape) for k, v in keymap.flatten_state(state).items()}
  flat = keymap.to_jax(sd, table, shapes)
  nnx.update(
      model,
      nnx.from_flat_state(
          [(path, jnp.asarray(flat[".".join(map(str, path))])) for path, _ in nnx.to_flat_state(state)]
      ),
  )
  return model


@jax.jit(static_argnames=("gd", "patch_size"))
def _forward_jit(gd, state, lat, t, cap, mask, patch_size=None):
  return nnx.merge(gd, state)(lat, t, cap, mask, patch_size=patch_size)


def _run(model, lat, t, cap, mask, patch_size=None):
  """Jitted forward (one compile per config and shape; faster than op-by-op on CPU)."""
  gd, state = nnx.split(model)
  return _forward_jit(gd, state, *(jnp.asarray(a) for a in (lat, t, cap, mask)), patch_size=patch_size)


def _inputs(cfg, b, h, w, L, lens=None, seed=0, scatter=False):
  rng = np.random.default_rng(seed)
  lat = rng.standard_normal((b, h, w, cfg.in_channels)).astype(np.float32)
  t = rng.uniform(0.05, 0.95, (b,)).astype(np.float32)
  cap = rng.standard_normal((b, L, cfg.cap_feat_dim)).astype(np.float32)
  mask = np.ones((b, L), bool)
  for i, n in enumerate(lens or []):
    mask[i] = False
    idx = np.sort(rng.choice(L, n, replace=False)) if scatter and i % 2 else np.arange(n)
    mask[i, idx] = True
  return lat, t, cap, mask


def _theirs(model, lat, t, cap, mask, patch_size):
  """diffusers under our convention: −model([x (C,1,H,W)], 1 − t, [cap[mask]]), back to NHWC."""
  x = [torch.from_numpy(l).permute(2, 0, 1).unsqueeze(1) for l in lat]
  caps = [torch.from_numpy(c[m]) for c, m in zip(cap, mask)]
  with torch.no_grad():
    out = model(x, torch.from_numpy(1.0 - t), caps, patch_size=patch_size, return_dict=False)[0]
  return -torch.stack(out).squeeze(2).permute(0, 2, 3, 1).numpy()


def _rel_err(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours) - theirs))) / max(1.0, float(np.max(np.abs(theirs))))


@pytest.fixture(scope="module")
def model_a():
  tm = _torch_model(CFG_A, seed=0)
  return tm, config_from_torch(dict(tm.config)), _torch_state(tm)


@pytest.fixture(scope="module")
def model_b():
  tm = _torch_model(CFG_B, seed=1)
  return tm, config_from_torch(dict(tm.config)), _torch_state(tm)


def test_parity_equal_length_captions(model_a):
  tm, cfg, sd = model_a
  ours = _ours(cfg, sd)
  lat, t, cap, mask = _inputs(cfg, 2, 6, 10, 7)  # non-square 3x5 token grid; 15 and 7 tokens → padded to 32
  theirs = _theirs(tm, lat, t, cap, mask, 2)
  out = _run(ours, lat, t, cap, mask)
  assert out.shape == lat.shape and out.dtype == jnp.float32
  assert _rel_err(out, theirs) <= 1e-4, _rel_err(out, theirs)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_parity_ragged_captions(model_b, patch_size):
  """Captions of 5 (prefix) and 37 (scattered) valid tokens out of 40 slots: diffusers gets cap[mask]."""
  tm, cfg, sd = model_b
  ours = _ours(cfg, sd)
  lat, t, cap, mask = _inputs(cfg, 2, 4, 12, 40, lens=[5, 37], seed=3, scatter=True)
  theirs = _theirs(tm, lat, t, cap, mask, patch_size)
  out = _run(ours, lat, t, cap, mask, patch_size)
  assert _rel_err(out, theirs) <= 1e-4, _rel_err(out, theirs)


def test_masked_caption_values_do_not_matter(model_b):
  _, cfg, sd = model_b
  ours = _ours(cfg, sd)
  lat, t, cap, mask = _inputs(cfg, 2, 4, 12, 40, lens=[5, 37], seed=4, scatter=True)
  junk = np.where(mask[..., None], cap, 1e3 * np.random.default_rng(9).standard_normal(cap.shape)).astype(np.float32)
  a = _run(ours, lat, t, cap, mask)
  b = _run(ours, lat, t, junk, mask)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ...while the valid values do matter (the test can fail).
  c = _run(ours, lat, t, cap + 1.0, mask)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_broken_mapping_fails_parity(model_a):
  """Swapping SwiGLU w1 ↔ w3 of one layer (same shapes, loads fine) must break parity."""
  tm, cfg, sd = model_a
  broken = dataclasses.replace(
      KEY_TABLE,
      rules=[
          keymap.Rule(r"layers\.1\.feed_forward\.w1\.kernel", "layers.1.feed_forward.w3.weight", "linear"),
          keymap.Rule(r"layers\.1\.feed_forward\.w3\.kernel", "layers.1.feed_forward.w1.weight", "linear"),
      ],
  )
  lat, t, cap, mask = _inputs(cfg, 2, 6, 10, 7)
  theirs = _theirs(tm, lat, t, cap, mask, 2)
  out = _run(_ours(cfg, sd, broken), lat, t, cap, mask)
  assert _rel_err(out, theirs) > 1e-2


def test_time_and_sign_convention_matters(model_a):
  """Feeding diffusers t instead of 1 − t (or not negating) is far from ours: the mapping is not vacuous."""
  tm, cfg, sd = model_a
  lat, t, cap, mask = _inputs(cfg, 2, 6, 10, 7, seed=5)
  out = np.asarray(_run(_ours(cfg, sd), lat, t, cap, mask))
  wrong_t = _theirs(tm, lat, 1.0 - t, cap, mask, 2)
  assert _rel_err(out, wrong_t) > 1e-2
  assert _rel_err(out, -_theirs(tm, lat, t, cap, mask, 2)) > 1e-2


def test_round_trip_bit_exact(model_b):
  tm, cfg, sd = model_b
  ours = _ours(cfg, sd)
  back = keymap.to_torch(keymap.flatten_state(nnx.state(ours, nnx.Param)), KEY_TABLE)
  back = {k: np.asarray(v) for k, v in back.items()}
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
  # Strictness: a missing key is reported by name.
  partial = {k: v for k, v in sd.items() if k != "layers.0.attention.to_q.weight"}
  shapes = {k: tuple(v.shape) for k, v in keymap.flatten_state(nnx.state(ours, nnx.Param)).items()}
  with pytest.raises(keymap.KeyMismatchError, match="layers.0.attention.to_q.weight"):
    keymap.to_jax(partial, KEY_TABLE, shapes)


@pytest.mark.slow
def test_remat_modes_equal():
  """Loss and gradients agree for remat 'none', 'full' and 'dots_saveable' (same init, ragged captions)."""
  # One block keeps the three backward compiles cheap; every block goes through the same S3DiT._block.
  base = S3DiTConfig(
      in_channels=4,
      dim=32,
      n_layers=1,
      n_refiner_layers=0,
      n_heads=1,
      n_kv_heads=1,
      cap_feat_dim=8,
      axes_dims=(8, 12, 12),
      axes_lens=(128, 16, 16),
  )
  lat, t, cap, mask = (jnp.asarray(a) for a in _inputs(base, 2, 4, 6, 5, lens=[5, 2], seed=6))
  params = jax.jit(lambda: nnx.state(S3DiT(base, rngs=nnx.Rngs(0)), nnx.Param))()
  results = []
  for mode in ("none", "full", "dots_saveable"):
    gd, _, rest = nnx.split(
        nnx.eval_shape(lambda m=mode: S3DiT(dataclasses.replace(base, remat=m), rngs=nnx.Rngs(0))), nnx.Param, ...
    )
    loss = lambda p, gd=gd, rest=rest: jnp.mean(nnx.merge(gd, p, rest)(lat, t, cap, mask) ** 2)  # noqa: E731
    if mode != "none":  # the blocks really are rematerialised
      assert "checkpoint" in str(jax.make_jaxpr(loss)(params)) or "remat" in str(jax.make_jaxpr(loss)(params))
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  l0, g0 = results[0]
  for l1, g1 in results[1:]:
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):  # equal up to fp32 reassociation
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(a)))))
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0)) > 0


def test_config_round_trip_and_errors(model_a):
  tm, cfg, _ = model_a
  assert cfg == S3DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in CFG_A.items()})
  back = config_to_torch(cfg)
  assert back == {**CFG_A, "siglip_feat_dim": None}
  assert config_from_torch(back, remat="full").remat == "full"
  with pytest.raises(ValueError, match="siglip_feat_dim"):
    config_from_torch({**back, "siglip_feat_dim": 1152})
  with pytest.raises(ValueError, match="n_kv_heads"):
    S3DiTConfig(n_kv_heads=10)
  with pytest.raises(ValueError, match="axes_dims"):
    S3DiTConfig(axes_dims=(32, 48, 40))
  with pytest.raises(ValueError, match="remat"):
    S3DiTConfig(remat="some")
  with pytest.raises(ValueError, match="bogus"):
    config_from_torch({**back, "bogus": 1})
  # Input checks name the offending shape before any compute.
  abstract = nnx.eval_shape(lambda: S3DiT(cfg, rngs=nnx.Rngs(0)))
  t, cap = jnp.zeros((1,)), jnp.zeros((1, 7, cfg.cap_feat_dim))
  with pytest.raises(ValueError, match="NHWC"):
    abstract(jnp.zeros((1, 4, 6, 6)), t, cap)
  with pytest.raises(ValueError, match="divisible by patch_size"):
    abstract(jnp.zeros((1, 5, 6, cfg.in_channels)), t, cap)
  with pytest.raises(ValueError, match="patch_size=3"):
    abstract(jnp.zeros((1, 6, 6, cfg.in_channels)), t, cap, patch_size=3)
  with pytest.raises(ValueError, match="axes_lens"):
    abstract(jnp.zeros((1, 6, 6, cfg.in_channels)), t, jnp.zeros((1, 120, cfg.cap_feat_dim)))


def test_full_size_param_count():
  """IOMM-XL at full size, abstractly: ≈6e9 and exactly diffusers' count (torch meta device, no memory)."""
  cfg = S3DiTConfig()
  abstract = nnx.eval_shape(lambda: S3DiT(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  n = count_params(nnx.state(abstract, nnx.Param))
  assert abs(n - 6.0e9) <= 0.05 * 6.0e9, n
  with torch.device("meta"):
    ref = diffusers.ZImageTransformer2DModel(**cfg.to_diffusers())
  assert n == sum(p.numel() for p in ref.parameters()) == 6_150_975_552
  # Every parameter carries logical axes from the allowed set.
  allowed = {"embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", None}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    axes = var.get_metadata().get("axes")
    assert axes is not None and len(axes) == len(var.shape) and set(axes) <= allowed, path
