"""RQA: parity with the PyTorch reference, two-way conversion, parameter count, padding invariance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from iomm_jax.models import keymap
from iomm_jax.models.rqa_keys import KEY_TABLE, config_from_torch, config_to_torch
from iomm_jax.convert.torch_rqa import TorchRQA
from iomm_jax.models.layers import count_params
from iomm_jax.models.rqa import RQA, RQAConfig

TINY = RQAConfig(dim=64, num_queries=8, num_heads=4, mlp_ratio=4.0, num_layers=2, eps=1e-6)


def _param_shapes(model):
  return {k: tuple(v.shape) for k, v in keymap.flatten_state(nnx.state(model, nnx.Param)).items()}


def _load(model, torch_sd, table=KEY_TABLE):
  flat = keymap.to_jax(torch_sd, table, _param_shapes(model))
  nnx.update(
      model,
      nnx.from_flat_state(
          [(tuple(int(p) if p.isdigit() else p for p in k.split(".")), jnp.asarray(v)) for k, v in flat.items()]
      ),
  )


def _numpy_sd(module):
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def pair():
  torch.manual_seed(0)
  ref = TorchRQA(**config_to_torch(TINY)).eval()
  # Non-zero biases so a wrong bias mapping shows up (torch initialises MHA biases to zero).
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
  ours = RQA(config_from_torch(ref.config), rngs=nnx.Rngs(1))
  _load(ours, _numpy_sd(ref))
  return ref, ours


def _inputs(b=2, l=11, d=TINY.dim, pad=True):
  rng = np.random.default_rng(0)
  c = rng.normal(size=(b, l, d)).astype(np.float32) * 2.0 + 0.5
  mask = np.ones((b, l), bool)
  if pad:
    mask[0, 7:] = False
    mask[1, 4:] = False
  return c, mask


def _run_torch(ref, c, mask):
  with torch.no_grad():
    return ref(torch.from_numpy(c), None if mask is None else torch.from_numpy(mask)).numpy()


def _assert_close(ours, theirs):
  tol = 1e-4 * max(1.0, float(np.abs(theirs).max()))
  diff = float(np.abs(np.asarray(ours) - theirs).max())
  assert diff <= tol, f"max|ours-theirs|={diff} > {tol}"


@pytest.mark.parametrize("padded", [False, True])
def test_parity(pair, padded):
  ref, ours = pair
  c, mask = _inputs(pad=padded)
  theirs = _run_torch(ref, c, mask if padded else None)
  out = ours(jnp.asarray(c), jnp.asarray(mask) if padded else None)
  assert out.shape == (2, TINY.num_queries, TINY.dim)
  _assert_close(out, theirs)


def test_round_trip_bit_exact(pair):
  ref, ours = pair
  back = keymap.to_torch(keymap.flatten_state(nnx.state(ours, nnx.Param)), KEY_TABLE)
  sd = _numpy_sd(ref)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  # And the torch module accepts it strictly.
  ref2 = TorchRQA(**config_to_torch(TINY))
  ref2.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)


def test_broken_mapping_fails(pair):
  ref, _ = pair
  sd = _numpy_sd(ref)
  # Swap the q and k thirds of the fused projection: shapes still fit, outputs must not.
  w = sd["query_blocks.0.cross_attn.in_proj_weight"].copy()
  d = TINY.dim
  w[:d], w[d : 2 * d] = w[d : 2 * d].copy(), w[:d].copy()
  sd["query_blocks.0.cross_attn.in_proj_weight"] = w
  broken = RQA(TINY, rngs=nnx.Rngs(2))
  _load(broken, sd)
  c, mask = _inputs()
  theirs = _run_torch(ref, c, mask)
  diff = float(np.abs(np.asarray(broken(jnp.asarray(c), jnp.asarray(mask))) - theirs).max())
  assert diff > 1e-2, diff
  # A missing key is reported by name.
  del sd["query_blocks.1.mlp.fc2.bias"]
  with pytest.raises(keymap.KeyMismatchError, match="query_blocks.1.mlp.fc2.bias"):
    _load(broken, sd)


def test_padded_keys_do_not_matter(pair):
  _, ours = pair
  c, mask = _inputs()
  c2 = c.copy()
  c2[~mask] = 1e3 * np.random.default_rng(1).normal(size=c2[~mask].shape)
  a = ours(jnp.asarray(c), jnp.asarray(mask))
  b = ours(jnp.asarray(c2), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ...while the valid keys do.
  c3 = c.copy()
  c3[0, 0, :5] += 1.0  # not a constant shift: the LayerNorm would remove that
  assert float(jnp.abs(ours(jnp.asarray(c3), jnp.asarray(mask)) - a).max()) > 1e-4


def test_full_size_param_count_and_axes():
  abstract = nnx.eval_shape(lambda: RQA(RQAConfig(), rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  n = count_params(params)
  assert n == 256 * 1536 + 4 * 1536**2 + 4 * 1536 + 8 * 1536**2 + 5 * 1536  # 28,718,592
  assert abs(n - 29e6) <= 0.05 * 29e6
  allowed = {"embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", None}
  for path, var in nnx.to_flat_state(params):
    axes = var.get_metadata().get("axes")
    assert axes is not None and len(axes) == len(var.shape) and set(axes) <= allowed, (path, axes)


def test_bf16_compute_and_meta_query_init():
  model = RQA(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  c, mask = _inputs()
  out = jax.jit(lambda m, c, k: m(c, k))(model, jnp.asarray(c), jnp.asarray(mask))
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  big = RQA(dataclasses.replace(TINY, dim=256, num_queries=256), rngs=nnx.Rngs(0))
  std = float(jnp.std(big.meta_queries[...]))
  assert abs(std - 1 / 16) < 0.005, std
  with pytest.raises(ValueError, match="key_mask"):
    model(jnp.asarray(c), jnp.asarray(mask[:, :3]))
