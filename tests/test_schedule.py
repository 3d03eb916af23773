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
