"""Muon for IOMM-XL: which parameters it updates, and an update size that means the same lr as AdamW's."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from iomm_jax.config import base_config
from iomm_jax.train import builder, optimizers
from helpers import load_config, tiny_config


def _train_cfg(optimizer: str) -> ml_collections.ConfigDict:
  t = base_config().train
  t.optimizer, t.warmup_steps, t.grad_clip, t.lr = optimizer, 0, 0.0, 1.0
  return t


def _labels(config) -> dict[str, str]:
  run = builder.build(config, load_frozen=False)
  hidden = optimizers.muon_labels(run.abstract_state.params, _hidden(config))
  return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(hidden)[0]}


def _hidden(config):
  from flax import nnx
  from iomm_jax.models import factory

  gen = nnx.eval_shape(lambda: factory.make_generator(config, nnx.Rngs(0)))
  return {"dit": type(gen.dit).HIDDEN_BLOCKS, "rqa": type(gen.rqa).HIDDEN_BLOCKS}


def test_muon_partition_mmdit():
  labels = _labels(tiny_config())
  muon = {k for k, v in labels.items() if v == "muon"}
  assert "dit/transformer_blocks/0/attn/to_q/kernel" in muon
  assert "dit/single_transformer_blocks/0/proj_mlp/kernel" in muon
  assert "rqa/query_blocks/0/mlp/fc1/kernel" in muon
  for adam in (
      "dit/x_embedder/kernel",
      "dit/context_embedder/kernel",
      "dit/proj_out/kernel",
      "dit/norm_out/linear/kernel",
      "dit/time_text_embed/timestep_embedder/linear_1/kernel",
      "rqa/meta_queries",
      "dit/transformer_blocks/0/attn/to_q/bias",
      "dit/transformer_blocks/0/attn/norm_q/weight",
  ):
    assert labels[adam] == "adam", adam
  assert all(k.endswith("kernel") for k in muon)


def test_muon_partition_s3dit():
  c = load_config("iomm_xl")
  c.model.mllm.arch = tiny_config().model.mllm.arch
  c.model.mllm.path = ""
  width = 64
  c.model.dit.arch = dict(
      dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, axes_dims=(8, 12, 12), cap_feat_dim=width
  )
  c.model.rqa.num_heads, c.model.rqa.num_queries = 2, 4
  c.train.global_batch = 8
  c.data.source, c.data.cache_path = "shapes", ""
  c.mesh.data, c.mesh.fsdp = -1, 1
  labels = _labels(c)
  assert labels["dit/layers/0/attention/to_q/kernel"] == "muon"
  assert labels["dit/noise_refiner/0/feed_forward/w1/kernel"] == "muon"
  assert labels["dit/context_refiner/0/attention/to_out/0/kernel"] == "muon"
  for adam in (
      "dit/cap_embedder/1/kernel",
      "dit/all_x_embedder/2-1/kernel",
      "dit/all_final_layer/2-1/linear/kernel",
      "dit/cap_pad_token",
      "dit/layers/0/attention_norm1/weight",
  ):
    assert labels[adam] == "adam", adam


def _updates(train_cfg, shape=(256, 384), steps: int = 40) -> list:
  """The hidden matrix's updates over `steps` pure-noise gradients."""
  params = {"dit": {"transformer_blocks": [{"ff": {"kernel": jnp.zeros(shape)}}]}}
  opt = optimizers.make_optimizer(train_cfg, {"dit": ("transformer_blocks",)})
  state = opt.init(params)
  out = []
  for i in range(steps):
    g = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
    upd, state = opt.update(g, state, params)
    out.append(upd["dit"]["transformer_blocks"][0]["ff"]["kernel"])
  return out


def _update_rms(optimizer: str, shape=(256, 384)) -> float:
  """Mean update RMS over the last 10 of 40 updates on pure-noise gradients (lr 1)."""
  return float(np.mean([jnp.sqrt(jnp.mean(u**2)) for u in _updates(_train_cfg(optimizer), shape)[-10:]]))


@pytest.mark.slow
def test_muon_update_rms_matches_adamw():
  muon, adam = _update_rms("muon"), _update_rms("adamw")
  assert 0.7 < muon / adam < 1.4, (muon, adam)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(64, 64), (512, 128)])
def test_muon_update_rms_independent_of_shape(shape):
  assert _update_rms("muon", shape) == pytest.approx(optimizers.MUON_UPDATE_RMS, rel=0.25)


def test_muon_momentum_is_its_own_field():
  base = _updates(_train_cfg("muon"), (64, 64), 5)
  t = _train_cfg("muon")
  t.b2 = 0.5  # AdamW's β2 no longer reaches Muon
  np.testing.assert_allclose(_updates(t, (64, 64), 5)[-1], base[-1], rtol=1e-6)
  t.muon_momentum = 0.0
  assert not np.allclose(_updates(t, (64, 64), 5)[-1], base[-1], rtol=1e-2)
