"""Stage 2 starts from a stage-1 workdir directly (config.init.workdir): its EMA or raw generator weights, a fresh
optimizer and step; runs that do not fit fail naming config.init.workdir."""

import jax
import numpy as np
import pytest

from helpers import tiny_config
from iomm_jax import config as config_lib
from iomm_jax import config_validation
from iomm_jax.train import builder, loop, restore
from iomm_jax.train.warm_start import WarmStartError


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  work = tmp_path_factory.mktemp("stage1")
  c = tiny_config("short", train__num_steps=6, train__ckpt_every=6, train__sample_every=0)
  loop.train(c, str(work))
  return work


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
@pytest.mark.parametrize("use_ema", [True, False])
def test_stage2_starts_from_stage1_weights(stage1, use_ema):
  _, src_params, step = restore.load_for_inference(str(stage1), use_ema=use_ema)
  assert step == 6
  c = tiny_config("finetune,short", init__workdir=str(stage1), init__use_ema=use_ema)
  config_validation.validate(c)
  state = builder.build(c).init_state()
  assert int(state.step) == 0
  for got, want in zip(_leaves(state.params), _leaves(src_params)):
    np.testing.assert_array_equal(got, want)
  # EMA restarts from the loaded weights; the optimizer moments start at zero.
  for got, want in zip(_leaves(state.ema_params), _leaves(src_params)):
    np.testing.assert_array_equal(got, want)
  assert all(not np.any(x) for x in _leaves(state.opt_state) if x.dtype.kind == "f")
  # Without init.workdir the same config starts elsewhere (the test would pass vacuously otherwise).
  fresh = builder.build(tiny_config("finetune,short")).init_state()
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(fresh.params), _leaves(src_params)))


@pytest.mark.slow
def test_ema_and_raw_weights_differ(stage1):
  _, ema, _ = restore.load_for_inference(str(stage1), use_ema=True)
  _, raw, _ = restore.load_for_inference(str(stage1), use_ema=False)
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(ema), _leaves(raw)))
  # Unasked, the apps take the weights the run's own config.sample.use_ema names, as its training grids did.
  _, default, _ = restore.load_for_inference(str(stage1))
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(default), _leaves(ema)))
  config_file = stage1 / "config.json"
  saved = config_file.read_text()
  try:
    config_file.write_text(saved.replace('"use_ema": true', '"use_ema": false'))
    assert '"use_ema": false' in config_file.read_text()
    _, default, _ = restore.load_for_inference(str(stage1))
  finally:
    config_file.write_text(saved)
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(default), _leaves(raw)))


@pytest.mark.slow
def test_workdirs_that_do_not_fit_fail_naming_the_field(stage1, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="config.init.workdir=.* is not a training workdir"):
    config_validation.validate(tiny_config("finetune,short", init__workdir=str(tmp_path)))
  with pytest.raises(config_lib.ConfigError, match="config.init.workdir is set together with"):
    config_validation.validate(tiny_config("finetune,short", init__workdir=str(stage1), init__rqa=str(tmp_path)))
  # At start, as validate runs it (before the workdir is written, the data opened or the frozen weights read) ...
  with pytest.raises(config_lib.ConfigError, match="train.optimizer='adamw' but this run has train.optimizer='muon'"):
    config_validation.validate(tiny_config("finetune,short", init__workdir=str(stage1), train__optimizer="muon"))
  # ... and where the state is built without it.
  with pytest.raises(WarmStartError, match="train.optimizer='adamw'"):
    builder.build(tiny_config("finetune,short", init__workdir=str(stage1), train__optimizer="muon")).init_state()
  with pytest.raises(WarmStartError, match="EMA"):
    builder.build(tiny_config("finetune,short", init__workdir=str(stage1), train__ema_decay=0.0)).init_state()
  with pytest.raises(WarmStartError, match="without REPA's head but this run has config.train.repa_weight=0.5"):
    builder.build(tiny_config("finetune,short", init__workdir=str(stage1), train__repa_weight=0.5)).init_state()
  deeper = tiny_config("finetune,short", init__workdir=str(stage1))
  deeper.model.dit.arch.num_single_layers = 3
  with pytest.raises(
      WarmStartError,
      match=r"does not fit this run's model \(dit\.single_transformer_blocks\.2\..*: in this run, not in the checkpoint",
  ):
    builder.build(deeper).init_state()
  shallower = tiny_config("finetune,short", init__workdir=str(stage1))
  shallower.model.dit.arch.num_single_layers = 1
  with pytest.raises(
      WarmStartError, match=r"dit\.single_transformer_blocks\.1\..*: in the checkpoint, not in this run"
  ):
    builder.build(shallower).init_state()
  wider = tiny_config("finetune,short", init__workdir=str(stage1))
  wider.model.dit.arch.num_attention_heads = 8  # width 128 against the stored 64
  with pytest.raises(WarmStartError, match=r"dit\.context_embedder\.bias: stored \(64,\), this run \(128,\)"):
    builder.build(wider).init_state()


def test_an_init_workdir_whose_config_json_was_cut_short_is_one_line_naming_it(tmp_path):
  from iomm_jax.train import warm_start

  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text('{"model": {"dit": ')
  c = tiny_config("finetune,short", init__workdir=str(tmp_path))
  with pytest.raises(WarmStartError) as e:
    warm_start.params_from_workdir(c, None, None)  # the config is read before any checkpoint
  msg = str(e.value)
  assert msg.startswith(
      f"config.init.workdir={str(tmp_path)!r}: {tmp_path / 'config.json'} is not valid JSON at line 1"
  )
  assert "\n" not in msg
