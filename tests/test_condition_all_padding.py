"""condition='all': the DiT reads every LLM position, and the template's left padding must not reach the image.

The padded positions' hidden states are replaced by large noise (the LLM's output there is whatever the pad ids
give); the velocity, the sampler's images and the training loss must not move. That pins the pooled vector's mask
(models/dit_families.py), encode_condition's 'all' mask (models/iomm.py) and `masked=True` in the sampler and the
training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config
from iomm_jax import parallel, sampling
from iomm_jax.models import iomm
from iomm_jax.models.internvl import InternVL
from iomm_jax.train import builder, generate as generate_lib, step as step_lib

PROMPTS = ("a red circle", "a blue square above a green triangle")  # two lengths: two paddings
NOISE = 100.0


def _perturbed(tree, seed, scale=0.05):
  """tree + scale·N(0, 1) leaf by leaf: off adaLN-Zero's init, where the DiT ignores its condition altogether."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup():
  """(run, params, gen, mllm, ae): a 1-layer tiny run with condition='all' on one device, generator perturbed."""
  c = tiny_config(model__condition="all", train__mask_ratio=0.0, train__p_uncond=0.5)
  c.model.dit.arch.num_layers = c.model.dit.arch.num_single_layers = 1
  c.model.mllm.arch.text["num_hidden_layers"] = 1
  c.model.mllm.arch.vision["num_hidden_layers"] = 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  run = builder.build(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:1]))
  params = _perturbed(run.init_state().params, 0)
  gen = nnx.merge(run.statics.gen_def, params)
  mllm = nnx.merge(run.statics.mllm_def, run.frozen["mllm"])
  ae = nnx.merge(run.statics.ae_def, run.frozen["ae"])
  return run, params, gen, mllm, ae


def _noisy_padding(monkeypatch, seed):
  """The LLM's hidden states at its padded positions (attention_mask False) → NOISE·N(0, 1), drawn from `seed`."""
  real = InternVL.language_model_forward

  def forward(self, inputs_embeds, attention_mask=None, position_ids=None):
    out = real(self, inputs_embeds, attention_mask, position_ids)
    noise = NOISE * jax.random.normal(jax.random.key(seed), out.shape, out.dtype)
    return jnp.where(attention_mask[..., None], out, noise)

  monkeypatch.setattr(InternVL, "language_model_forward", forward)


def _text(run):
  ids, valid, use = generate_lib.text_condition(run.templates, run.tokenize, PROMPTS)
  assert not np.asarray(valid).all(axis=1).any()  # every row has left padding
  return ids, valid, use


def test_all_mode_mask_is_the_template_validity_then_the_queries(setup):
  """encode_condition(mode='all') returns h over template + queries and mask = concat(valid, ones(Q))."""
  run, _, gen, mllm, _ = setup
  ids, valid, use = _text(run)
  keep = jnp.ones((len(PROMPTS), len(run.templates.image_positions)), bool)
  h, mask = iomm.encode_condition(gen.rqa, mllm, run.templates, ids, valid, None, keep, use, mode="all")
  q = run.config.model.rqa.num_queries
  assert h.shape[1] == run.templates.length + q
  want = np.concatenate([np.asarray(valid), np.ones((len(PROMPTS), q), bool)], axis=1)
  np.testing.assert_array_equal(np.asarray(mask), want)


def test_velocity_ignores_the_padded_condition_positions(setup):
  """With masked=True the velocity does not change when h's padded positions hold large noise (attention masks
  them and the pooled vector is the mean over valid positions only); unmasked, the same noise changes it."""
  run, _, gen, mllm, _ = setup
  ids, valid, use = _text(run)
  keep = jnp.ones((len(PROMPTS), len(run.templates.image_positions)), bool)
  h, mask = iomm.encode_condition(gen.rqa, mllm, run.templates, ids, valid, None, keep, use, mode="all")
  real = jnp.concatenate([valid, jnp.ones((len(PROMPTS), run.config.model.rqa.num_queries), bool)], axis=1)
  noisy = jnp.where(real[..., None], h, NOISE * jax.random.normal(jax.random.key(3), h.shape, h.dtype))
  x_t = jax.random.normal(jax.random.key(4), (len(PROMPTS),) + tuple(run.latent_shape))
  t = jnp.array([0.3, 0.8])
  v = np.asarray(gen.velocity(x_t, t, h, mask, masked=True))
  np.testing.assert_allclose(np.asarray(gen.velocity(x_t, t, noisy, mask, masked=True)), v, atol=1e-5, rtol=0)
  # the noise does reach an unmasked DiT: the check above is not vacuous
  assert np.abs(np.asarray(gen.velocity(x_t, t, noisy, mask, masked=False)) - v).max() > 1e-2


def test_sampler_ignores_the_padded_condition_positions(setup, monkeypatch):
  """sampling.generate(condition='all') gives the same images whatever the LLM leaves at its padded positions
  (conditional and empty-prompt branches alike)."""
  run, _, gen, mllm, ae = setup
  ids, valid, use = _text(run)
  out = []
  for seed in (1, 2):
    _noisy_padding(monkeypatch, seed)
    images = sampling.generate(
        gen, mllm, ae, run.templates, ids, valid, None, use, jax.random.key(0),
        latent_shape=run.latent_shape, steps=2, cfg_scale=3.0, condition="all",
    )  # fmt: skip
    out.append(np.asarray(images))
  assert (np.abs(out[0]) < 1).mean() > 0.5  # mostly unclipped: a difference would show
  np.testing.assert_allclose(out[1], out[0], atol=1e-5, rtol=0)


def test_training_loss_ignores_the_padded_condition_positions(setup, monkeypatch):
  """compute_loss with condition='all' on captioned (left-padded) samples, some dropped to the empty prompt: the
  loss does not depend on what the LLM leaves at its padded positions."""
  run, params, _, _, _ = setup
  c = run.config
  b = 4
  cap = np.zeros((b, c.data.max_text_tokens), np.int32)
  lens = np.zeros((b,), np.int32)
  for i, p in enumerate(PROMPTS + PROMPTS):
    t = run.tokenize(p)
    cap[i, : len(t)], lens[i] = t, len(t)
  rng = np.random.default_rng(0)
  r, v = c.data.resolution, c.data.vit_size
  batch = {
      "pixels": jnp.asarray(rng.uniform(-1, 1, (b, r, r, 3)), jnp.float32),
      "vit_pixels": jnp.asarray(rng.normal(size=(b, v, v, 3)), jnp.float32),
      "caption_ids": jnp.asarray(cap),
      "caption_len": jnp.asarray(lens),
      "is_image_only": jnp.asarray([False, False, False, True]),
  }
  losses = []
  for seed in (1, 2):
    _noisy_padding(monkeypatch, seed)
    loss = jax.jit(lambda p: step_lib.compute_loss(run.statics, p, run.frozen, batch, jax.random.key(5))[0])(params)
    losses.append(float(loss))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
