"""layers.attention: every implementation agrees with the explicit 'xla' reference, and config.model.attention
reaches every module (MM-DiT, S3-DiT, RQA, VAE, ViT, LLM)."""

import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config
from iomm_jax.config import ConfigError
from iomm_jax.config_validation import validate
from iomm_jax.models import attention_kernels, factory, flux_vae, flux_vae_blocks, layers, rqa, s3dit_blocks

B, LQ, LK, H, D = 2, 12, 19, 4, 8


def _qkv(seed, hk=H, lq=LQ, lk=LK):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.standard_normal((B, lq, H, D)), jnp.float32)
  k = jnp.asarray(r.standard_normal((B, lk, hk, D)), jnp.float32)
  v = jnp.asarray(r.standard_normal((B, lk, hk, D)), jnp.float32)
  return q, k, v


def _key_mask(lk=LK):
  m = np.ones((B, lk), bool)
  m[0, -7:] = False  # sample 0: right padding
  m[1, :3] = False  # sample 1: left padding
  return jnp.asarray(m)


def _naive(q, k, v, mask4):
  """Per-head numpy attention with K/V heads repeated: an independent reference for the GQA grouping."""
  q, k, v, m = (np.asarray(a, np.float64) for a in (q, k, v, np.broadcast_to(mask4, (B, H, q.shape[1], k.shape[1]))))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(m > 0, logits, -np.inf)
  with np.errstate(invalid="ignore"):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
  p = np.nan_to_num(p)  # fully masked rows → zeros
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("hk", [H, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("masking", ["none", "keys", "full4d", "causal_keys"])
def test_auto_equals_xla_and_a_naive_reference(hk, masking):
  lk = LQ if masking == "causal_keys" else LK
  q, k, v = _qkv(hk, hk=hk, lk=lk)
  kw, mask4 = {}, np.ones((B, 1, LQ, lk), bool)
  if masking in ("keys", "causal_keys"):
    kw["mask"] = _key_mask(lk)
    mask4 = np.asarray(kw["mask"])[:, None, None, :] & mask4
  if masking == "full4d":
    m = np.random.default_rng(1).random((B, 1, LQ, lk)) > 0.4
    m[0, 0, 3, :] = False  # one query row with no key at all: its output must be zero
    kw["mask"], mask4 = jnp.asarray(m), m
  if masking == "causal_keys":
    kw["is_causal"] = True
    mask4 = mask4 & np.tril(np.ones((LQ, lk), bool))
  ref = layers.attention(q, k, v, implementation="xla", **kw)
  auto = layers.attention(q, k, v, implementation="auto", **kw)
  np.testing.assert_allclose(np.asarray(ref), _naive(q, k, v, mask4), atol=1e-5)
  np.testing.assert_allclose(np.asarray(auto), np.asarray(ref), atol=1e-5)
  if masking == "full4d":
    assert np.all(np.asarray(auto)[0, 3] == 0) and np.all(np.asarray(ref)[0, 3] == 0)


@pytest.mark.parametrize("hk", [H, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("masking", ["none", "keys", "full4d_empty_row", "causal"])
def test_saved_probs_backward_equals_autodiff_of_the_reference(hk, masking):
  """The hand-written backward of 'auto' on CPU (attention_kernels.saved_probs_attention): output and the
  gradients of q, k, v equal JAX's autodiff of the 'xla' reference, masked, GQA, causal, with an empty row."""
  q, k, v = _qkv(11, hk=hk, lk=LQ)
  mask, causal = None, masking == "causal"
  if masking == "keys":
    mask = attention_kernels.mask4(_key_mask(LQ))
  if masking == "full4d_empty_row":
    m = np.random.default_rng(3).random((B, 1, LQ, LQ)) > 0.4
    m[1, 0, 5, :] = False
    mask = jnp.asarray(m)
  w = jnp.asarray(np.random.default_rng(4).standard_normal((B, LQ, H, D)), jnp.float32)

  def loss(fn, q, k, v):
    o = fn(q, k, v, mask, causal)
    return jnp.sum(w * o * jnp.cos(o)), o

  grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True))  # noqa: E731
  (_, ref), gref = grad(attention_kernels.xla_attention)(q, k, v)
  (_, out), gout = grad(attention_kernels.saved_probs_attention)(q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
  for name, a, b in zip("qkv", gout, gref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=f"d{name}")
  if masking == "full4d_empty_row":
    assert np.all(np.asarray(gout[0])[1, 5] == 0)  # a query with no key gets no gradient


def test_auto_on_cpu_runs_the_saved_probs_backward():
  q, k, v = _qkv(0)
  assert "custom_vjp_call" in str(jax.make_jaxpr(lambda q: layers.attention(q, k, v, implementation="auto"))(q))
  assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda q: layers.attention(q, k, v, implementation="xla"))(q))


def test_linear_weight_gradient_is_one_2d_matmul_on_cpu():
  """On CPU, Linear's weight gradient is a plain 2-D product over all leading axes (XLA:CPU copies N-D gradients
  into a transposed layout first); output and gradients equal autodiff of the N-D product."""
  lin = layers.Linear(6, 5, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 6)), jnp.float32)
  w, b = lin.kernel[...], lin.bias[...]
  r = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4, 5)), jnp.float32)
  ours = lambda x, w: jnp.sum(r * jnp.tanh(layers.matmul_2d_weight_grad(x, w) + b))  # noqa: E731
  ref = lambda x, w: jnp.sum(r * jnp.tanh(jnp.einsum("abci,io->abco", x, w) + b))  # noqa: E731
  dots = [e for e in jax.make_jaxpr(jax.grad(ours, argnums=1))(x, w).jaxpr.eqns if e.primitive.name == "dot_general"]
  weight_grad = [e for e in dots if e.outvars[0].aval.shape == (6, 5)]
  assert [tuple(v.aval.shape) for v in weight_grad[0].invars] == [(6, 24), (24, 5)]
  np.testing.assert_allclose(np.asarray(lin(x)), np.asarray(jnp.einsum("abci,io->abco", x, w) + b), atol=1e-5)
  for a, e in zip(jax.grad(ours, argnums=(0, 1))(x, w), jax.grad(ref, argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-5)
  assert "custom_vjp_call" in str(jax.make_jaxpr(lin)(x))


@pytest.mark.slow
@pytest.mark.parametrize("hk,causal", [(H, False), (2, False), (2, True)], ids=["mha", "gqa", "gqa_causal"])
def test_splash_kernel_matches_xla_in_interpret_mode(hk, causal):
  """The TPU Pallas kernel, run by the Pallas interpreter on CPU: forward and the gradient of q, k, v."""
  lk = LQ if causal else LK
  q, k, v = _qkv(7, hk=hk, lk=lk)
  mask = _key_mask(lk)

  def loss(impl, q, k, v):
    o = layers.attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
    return jnp.sum(o * jnp.cos(o)), o

  (_, ref), gref = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, out), gout = jax.value_and_grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
  for a, b in zip(gout, gref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)


def test_splash_refuses_general_masks_and_unknown_names_fail():
  q, k, v = _qkv(0)
  with pytest.raises(ValueError, match="key-padding"):
    layers.attention(q, k, v, mask=jnp.ones((B, 1, LQ, LK), bool), implementation="splash")
  with pytest.raises(ValueError, match="not one of"):
    layers.attention(q, k, v, implementation="flash")
  c = tiny_config()
  c.model.attention = "flash"
  with pytest.raises(ConfigError, match="model.attention"):
    validate(c)
  c = tiny_config()
  c.model.dit.arch["attention_impl"] = "cudnn"
  with pytest.raises(ValueError, match="config.model.attention"):
    factory.dit_config(c, 64)


@pytest.fixture
def spy(monkeypatch):
  """Every call of the attention function, as (calling module file, implementation); runs the 'xla' path."""
  calls = []
  real = layers.attention

  def fake(q, k, v, *, implementation="auto", **kw):
    calls.append((os.path.basename(inspect.stack()[1].filename), implementation))
    return real(q, k, v, implementation="xla", **kw)

  monkeypatch.setattr(layers, "attention", fake)
  for mod in (flux_vae_blocks, rqa, s3dit_blocks):  # they import the function by name
    monkeypatch.setattr(mod, "attention", fake)
  return calls


def _write_vae_folder(path):
  cfg = dict(
      in_channels=3,
      out_channels=3,
      down_block_types=["DownEncoderBlock2D"] * 2,
      up_block_types=["UpDecoderBlock2D"] * 2,
      block_out_channels=[8, 16],
      layers_per_block=1,
      latent_channels=4,
      norm_num_groups=4,
      sample_size=16,
  )
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)


@pytest.mark.slow
def test_model_attention_reaches_every_module(spy, tmp_path):
  setting = "cudnn"  # a non-default value; the spy runs the XLA path, so nothing needs a GPU
  c = tiny_config()
  c.model.attention = setting
  _write_vae_folder(str(tmp_path / "vae"))
  c.model.autoencoder.path = str(tmp_path / "vae")
  mcfg = factory.mllm_config(c)
  width = factory.mllm_width(mcfg)
  gen = factory.make_generator(c, nnx.Rngs(0), mcfg)
  mllm = factory.make_mllm(c, nnx.Rngs(1), mcfg)
  vae = flux_vae.FluxVAE(factory.vae_config(c), rngs=nnx.Rngs(2))
  b, lc = 2, 5
  cond = jnp.ones((b, lc, width))
  key_mask = jnp.array([[True] * lc, [True] * 3 + [False] * 2])
  n_img = 16
  dcfg = gen.dit.cfg
  jax.eval_shape(lambda: gen.rqa(cond, key_mask))
  jax.eval_shape(
      lambda: gen.dit(
          jnp.ones((b, n_img, dcfg.in_channels)),
          cond,
          cond.mean(1),
          jnp.ones((b,)),
          jnp.zeros((n_img, 3)),
          jnp.zeros((lc, 3)),
          key_mask,
      )
  )
  v = mcfg.vision.image_size
  jax.eval_shape(lambda: mllm.encode_image_tokens(jnp.ones((b, v, v, 3))))
  jax.eval_shape(lambda: mllm.language_model_forward(jnp.ones((b, lc, width)), key_mask))
  jax.eval_shape(lambda: vae.encode(jnp.ones((b, 16, 16, 3))))
  c.model.dit.kind = "s3dit"
  c.model.dit.arch = dict(
      in_channels=4,
      dim=32,
      n_layers=1,
      n_refiner_layers=1,
      n_heads=2,
      n_kv_heads=2,
      cap_feat_dim=width,
      axes_dims=(4, 6, 6),
      axes_lens=(64, 16, 16),
  )
  s3 = factory.make_generator(c, nnx.Rngs(3), mcfg).dit
  jax.eval_shape(lambda: s3(jnp.ones((b, 8, 8, 4)), jnp.ones((b,)), cond, key_mask))
  seen = {}
  for where, impl in spy:
    seen.setdefault(where, set()).add(impl)
  want = {"rqa.py", "mmdit_blocks.py", "internvit.py", "qwen2.py", "flux_vae_blocks.py", "s3dit_blocks.py"}
  assert set(seen) == want
  assert all(v == {setting} for v in seen.values()), seen
