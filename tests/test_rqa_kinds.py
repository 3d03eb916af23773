"""The condition ablations of model.rqa.kind: 'metaquery' (learned queries alone) and 'none' ("Raw": no queries, the
DiT reads every LLM position): their parameter sets, outputs, config checks, and that each trains."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config
from iomm_jax import config as config_lib
from iomm_jax import config_validation
from iomm_jax.models.rqa import RQA, RQAConfig
from iomm_jax.train import builder

TINY = RQAConfig(dim=32, num_queries=4, num_heads=4, num_layers=2)


def _paths(model) -> set[str]:
  return {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_parameter_sets_per_kind():
  full = _paths(RQA(TINY, rngs=nnx.Rngs(0)))
  meta = _paths(RQA(dataclasses.replace(TINY, kind="metaquery"), rngs=nnx.Rngs(0)))
  none = _paths(RQA(dataclasses.replace(TINY, kind="none"), rngs=nnx.Rngs(0)))
  assert "meta_queries" in full and any(p.startswith("query_blocks.1.cross_attn") for p in full)
  assert meta == {"meta_queries"} and none == set()


@pytest.mark.slow
def test_metaquery_ignores_its_input_and_none_adds_nothing():
  c = jax.random.normal(jax.random.key(0), (2, 5, 32))
  meta = RQA(dataclasses.replace(TINY, kind="metaquery"), rngs=nnx.Rngs(0))
  a, b = meta(c), meta(c * 3.0 + 1.0)
  np.testing.assert_array_equal(a, b)  # input-independent: MetaQuery's queries, not an adapter
  np.testing.assert_array_equal(a[0], meta.meta_queries[...])
  rqa = RQA(TINY, rngs=nnx.Rngs(0))
  assert not np.allclose(rqa(c), rqa(c * 3.0 + 1.0))  # the RQA does look at c
  assert RQA(dataclasses.replace(TINY, kind="none"), rngs=nnx.Rngs(0))(c).shape == (2, 0, 32)


def test_bad_kind_and_raw_without_all_positions_name_the_field():
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.rqa\.kind='bogus'"):
    config_validation.validate(tiny_config("short", model__rqa__kind="bogus"))
  with pytest.raises(config_lib.ConfigError, match=r"set config\.model\.condition='all'"):
    config_validation.validate(tiny_config("short", model__rqa__kind="none"))


@pytest.mark.slow
@pytest.mark.parametrize("kind, condition", [("metaquery", "query"), ("none", "all")])
def test_each_kind_trains(kind, condition):
  c = tiny_config("short", model__rqa__kind=kind, model__condition=condition, train__warmup_steps=0)
  config_validation.validate(c)
  run = builder.build(c)
  assert run.param_counts["rqa"] == (c.model.rqa.num_queries * run.mcfg.text.hidden_size if kind == "metaquery" else 0)
  state = run.init_state()
  rng = np.random.default_rng(0)
  b, n = c.train.global_batch, c.data.max_text_tokens
  batch = {
      "pixels": rng.uniform(-1, 1, (b, c.data.resolution, c.data.resolution, 3)).astype(np.float32),
      "vit_pixels": rng.normal(size=(b, c.data.vit_size, c.data.vit_size, 3)).astype(np.float32),
      "caption_ids": np.zeros((b, n), np.int32),
      "caption_len": np.zeros((b,), np.int32),
      "is_image_only": np.ones((b,), bool),
  }
  before = jax.tree.map(np.asarray, state.params)
  for _ in range(3):  # zero-initialised DiT gates pass no gradient to the condition for the first two steps
    state, m = run.train_step(state, run.frozen, jax.tree.map(jnp.asarray, batch))
  assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
  if kind == "metaquery":  # the queries learn: the condition's gradient reaches them through the frozen LLM
    assert not np.allclose(np.asarray(state.params["rqa"]["meta_queries"]), before["rqa"]["meta_queries"])
  else:
    assert "rqa" not in state.params or not jax.tree.leaves(state.params["rqa"])
