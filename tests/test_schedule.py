"""train.epochs → steps."""

import ml_collections
import pytest

from iomm_jax.config import base_config
from iomm_jax.train import schedule


def _t(**kw) -> ml_collections.ConfigDict:
  t = base_config().train
  for k, v in kw.items():
    t[k] = v
  return t


def test_epochs_convert_to_steps():
  # The paper's fine-tune: 10 epochs of ≈210K images at batch 256 → 8204 steps (not a fixed 10,000).
  assert schedule.num_steps(_t(epochs=10.0, global_batch=256), 210_000) == 8204
  assert schedule.num_steps(_t(epochs=1.0, global_batch=8), 20) == 3  # partial last batch rounds up


def test_zero_epochs_keeps_num_steps():
  assert schedule.num_steps(_t(epochs=0.0, num_steps=1234), 210_000) == 1234


def test_epochs_without_dataset_size_is_refused():
  with pytest.raises(ValueError, match="config.train.epochs"):
    schedule.num_steps(_t(epochs=2.0), None)


@pytest.mark.slow
def test_a_run_trains_epochs_of_its_dataset(tmp_path, capsys):
  """train.epochs reaches the loop: 1.5 epochs of 24 shapes images at batch 8 is 5 steps."""
  from helpers import tiny_config
  from iomm_jax.train import loop

  c = tiny_config("pretrain,short")
  c.data.num_images, c.train.global_batch, c.train.epochs = 24, 8, 1.5
  c.train.sample_every = 0
  summary = loop.train(c, str(tmp_path / "w"))
  assert summary["step"] == 5, summary
  assert "5 steps" in capsys.readouterr().out


def test_full_size_finetunes_are_ten_epochs():
  from helpers import load_config

  for arg in ("finetune", "finetune,1024"):
    c = load_config("iomm_b", arg)
    # 210K captioned images: 8204 steps at batch 256 (512²), 21875 at batch 96 (1024²): the same 10 epochs.
    assert c.train.epochs == 10.0
    assert schedule.num_steps(c.train, 210_000) == -(-10 * 210_000 // c.train.global_batch)


def test_cosine_lr_decays_to_its_final_fraction_after_warmup():
  from iomm_jax.train import optimizers

  t = _t(lr=2e-3, warmup_steps=10, lr_decay="cosine", lr_final_fraction=0.1, num_steps=999)
  lr = optimizers.lr_schedule(t, 110)  # the resolved length wins over train.num_steps
  assert float(lr(5)) == pytest.approx(1e-3)  # half-way through the warm-up
  assert float(lr(10)) == pytest.approx(2e-3)
  assert float(lr(60)) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
  assert float(lr(110)) == pytest.approx(2e-4)
  constant = optimizers.lr_schedule(_t(lr=2e-3, warmup_steps=10), 110)
  assert float(constant(110)) == pytest.approx(2e-3)  # the paper's default does not decay


def test_unknown_lr_decay_and_fraction_are_refused():
  from iomm_jax.config import ConfigError
  from iomm_jax.config_validation import validate
  from helpers import tiny_config

  c = tiny_config("pretrain,short")
  c.train.lr_decay = "linear"
  with pytest.raises(ConfigError, match="train.lr_decay"):
    validate(c, needs_data=False)
  c = tiny_config("pretrain,short")
  c.train.lr_final_fraction = 1.5
  with pytest.raises(ConfigError, match="train.lr_final_fraction"):
    validate(c, needs_data=False)


@pytest.mark.slow  # one in-process training run
def test_a_cosine_run_decays_over_the_steps_its_epochs_give(tmp_path):
  """train.epochs=1.5 of 24 images at batch 8 is 5 steps: the cosine reaches its floor at step 5, not at
  train.num_steps (20 in the short config)."""
  import json

  from helpers import tiny_config
  from iomm_jax.train import loop, optimizers

  c = tiny_config("pretrain,short")
  c.data.num_images, c.train.global_batch, c.train.epochs = 24, 8, 1.5
  c.train.sample_every, c.train.warmup_steps, c.train.log_every = 0, 0, 1
  c.train.lr_decay, c.train.lr_final_fraction = "cosine", 0.2
  loop.train(c, str(tmp_path / "w"))
  rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl") if '"lr"' in line]
  expected = optimizers.lr_schedule(c.train, 5)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  for r in rows:  # the row of step s logs the lr of its update, s − 1
    assert r["lr"] == pytest.approx(float(expected(r["step"] - 1)), rel=1e-5)
  assert rows[-1]["lr"] < 0.5 * c.train.lr  # decayed over 5 steps; over 20 it would still be ≈0.97·lr
