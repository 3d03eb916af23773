"""Stage 2 starts from a stage-1 workdir directly (config.init.workdir): its EMA or raw generator weights, a fresh
optimizer and step; runs that do not fit fail naming config.init.workdir."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import tiny_config
from iomm_jax import config as config_lib
from iomm_jax import config_validation
from iomm_jax import orbax_logs
from iomm_jax.train import builder, checkpoint, loop, restore
from iomm_jax.train.warm_start import WarmStartError


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  work = tmp_path_factory.mktemp("stage1")
  c = tiny_config("short", train__num_steps=6, train__ckpt_every=3, train__keep_checkpoints=2, train__sample_every=0)
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
  _, default, step = restore.load_for_inference(str(stage1))
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(default), _leaves(ema)))
  # Unasked, the newest of its checkpoints (steps 3 and 6), which another --step does not equal.
  assert step == 6 and sorted(os.listdir(stage1 / "checkpoints")) == ["3", "6"]
  _, older, older_step = restore.load_for_inference(str(stage1), step=3)
  assert older_step == 3 and any(not np.array_equal(a, b) for a, b in zip(_leaves(older), _leaves(ema)))
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
  other = tiny_config("finetune,short", init__workdir=str(stage1))
  other.model.dit.kind = "s3dit"
  assert "model.dit.kind='mmdit' but this run has model.dit.kind='s3dit'" in config_validation.init_workdir_problem(
      other
  )
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


@pytest.mark.slow
def test_stage2_may_change_optimizer_ema_and_repa(stage1, capsys):
  """Only the weights are read, so what shapes the rest of the train state may differ from stage 1's."""
  _, src_ema, _ = restore.load_for_inference(str(stage1), use_ema=True)
  _, src_raw, _ = restore.load_for_inference(str(stage1), use_ema=False)
  muon = builder.build(tiny_config("finetune,short", init__workdir=str(stage1), train__optimizer="muon")).init_state()
  for got, want in zip(_leaves(muon.params), _leaves(src_ema)):
    np.testing.assert_array_equal(got, want)
  no_ema = builder.build(tiny_config("finetune,short", init__workdir=str(stage1), train__ema_decay=0.0)).init_state()
  assert no_ema.ema_params == {}
  for got, want in zip(_leaves(no_ema.params), _leaves(src_ema)):
    np.testing.assert_array_equal(got, want)
  # REPA added in stage 2: the DiT and adapter come from stage 1, the new head starts as a fresh run's does.
  c = tiny_config("finetune,short", init__workdir=str(stage1), train__repa_weight=0.5)
  run = builder.build(c)
  state = run.init_state()
  fresh = builder.build(tiny_config("finetune,short", train__repa_weight=0.5)).init_state()
  for got, want in zip(_leaves(state.params["dit"]), _leaves(src_ema["dit"])):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(_leaves(state.params["repa"]), _leaves(fresh.params["repa"])):
    np.testing.assert_array_equal(got, want)
  # ... and a stage 3 without REPA starts from that run's weights, its head dropped.
  work = stage1.parent / "with_repa"
  loop.train(
      tiny_config(
          "finetune,short",
          init__workdir=str(stage1),
          train__repa_weight=0.5,
          train__num_steps=2,
          train__ckpt_every=2,
          train__sample_every=0,
      ),
      str(work),
  )
  _, with_head, _ = restore.load_for_inference(str(work), use_ema=True)
  assert "repa" in with_head
  plain = builder.build(tiny_config("finetune,short", init__workdir=str(work))).init_state()
  assert "repa" not in plain.params
  for got, want in zip(_leaves(plain.params["rqa"]), _leaves(with_head["rqa"])):
    np.testing.assert_array_equal(got, want)
  # A stage 1 trained without EMA gives its raw weights, with a note, though init.use_ema asks for EMA.
  raw_run = stage1.parent / "no_ema"
  loop.train(
      tiny_config("short", train__num_steps=2, train__ckpt_every=2, train__sample_every=0, train__ema_decay=0.0),
      str(raw_run),
  )
  capsys.readouterr()
  _, raw_src, _ = restore.load_for_inference(str(raw_run), use_ema=False)
  st = builder.build(tiny_config("finetune,short", init__workdir=str(raw_run))).init_state()
  for got, want in zip(_leaves(st.params), _leaves(raw_src)):
    np.testing.assert_array_equal(got, want)
  assert "was trained without EMA; starting from its raw weights" in capsys.readouterr().err
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(src_ema), _leaves(src_raw)))


@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_line_naming_it_and_what_to_do(stage1, tmp_path):
  """A truncated checkpoint file under init.workdir (or a workdir the apps load) is one line naming the step, the
  file and the cause, and what to do instead, which works."""
  work = tmp_path / "stage1"
  shutil.copytree(stage1, work)
  ckpts = work / "checkpoints"
  shutil.rmtree(ckpts / "3")
  shutil.copytree(ckpts / "6", ckpts / "2")  # an older checkpoint to fall back to
  for data in (ckpts / "6" / "state").rglob("d/*"):
    os.truncate(data, 10)
  c = tiny_config("finetune,short", init__workdir=str(work))
  with pytest.raises(WarmStartError) as e:
    builder.build(c).init_state()
  msg = str(e.value)
  assert msg.startswith(
      f"config.init.workdir={str(work)!r}: checkpoint 6 in {ckpts} could not be restored: item 'state' "
  )
  assert msg.endswith(
      f"To start from its next older checkpoint (step 2), move {ckpts / '6'} to {work}/damaged_checkpoints/"
  )
  assert "\n" not in msg and str(ckpts / "6" / "state") in msg
  with pytest.raises(restore.RunRestoreError) as e:
    restore.restore_run(str(work))
  assert str(e.value).startswith(f"checkpoint 6 in {ckpts} could not be restored")
  assert str(e.value).endswith("Load another with --step (it also has steps [2]).")
  # Doing as told works: the older checkpoint loads, in the apps and as stage 2's start.
  _, want, step = restore.restore_run(str(work), step=2)
  assert step == 2
  (work / checkpoint.DAMAGED_DIR).mkdir()
  (ckpts / "6").rename(work / checkpoint.DAMAGED_DIR / "6")
  state = builder.build(c).init_state()
  for got, ref in zip(_leaves(state.params), _leaves(want)):
    np.testing.assert_array_equal(got, ref)


def test_an_init_workdir_whose_config_json_was_cut_short_is_one_line_naming_it(tmp_path):
  from iomm_jax.train import warm_start

  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text('{"model": {"dit": ')
  c = tiny_config("finetune,short", init__workdir=str(tmp_path))
  with pytest.raises(WarmStartError) as e:
    warm_start.params_from_workdir(c, None)  # the config is read before any checkpoint
  msg = str(e.value)
  assert msg.startswith(
      f"config.init.workdir={str(tmp_path)!r}: {tmp_path / 'config.json'} is not valid JSON at line 1"
  )
  assert "\n" not in msg


def test_converted_adapter_weights_need_the_papers_adapter(tmp_path):
  c = tiny_config("pretrain,short", init__rqa=str(tmp_path))
  c.model.rqa.kind = "metaquery"
  with pytest.raises(
      config_lib.ConfigError, match=r"config.init.rqa=.* config.model.rqa.kind='metaquery' builds another"
  ):
    config_validation.validate(c)


@pytest.mark.slow
def test_loading_only_the_weights_prints_no_orbax_warnings(stage1, caplog):
  """The checkpoint's other items (config, data position) are not asked for: Orbax's 'could not be restored'
  warning about them is not shown to a user sampling a run."""
  logging.getLogger("absl").removeFilter(orbax_logs.QUIET_ORBAX)  # as in a fresh process: training added it here
  caplog.set_level("WARNING")
  restore.load_for_inference(str(stage1))
  assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]
