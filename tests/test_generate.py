"""Generation from a run samples on the training time grid (config.train.time_shift)."""

import jax
import pytest
import numpy as np

from iomm_jax import sampling
from iomm_jax.train import builder
from iomm_jax.train import generate as generate_lib
from helpers import tiny_config


@pytest.mark.slow
def test_sampling_uses_the_training_time_shift(monkeypatch):
  seen = []
  real = sampling.generate

  def recording(*args, shift=1.0, **kw):
    seen.append(shift)
    return real(*args, shift=shift, **kw)

  monkeypatch.setattr(sampling, "generate", recording)
  c = tiny_config("pretrain,short")
  c.train.time_shift = 3.0
  c.sample.steps = 2
  run = builder.build(c)
  params = run.init_state().params
  out = generate_lib.generate(run, params, prompts=["a red circle"], rng=jax.random.key(0))
  assert seen == [3.0]
  assert np.isfinite(np.asarray(out)).all()


def test_time_grid_shift_moves_the_steps_towards_noise():
  plain, shifted = np.asarray(sampling.time_grid(4)), np.asarray(sampling.time_grid(4, 3.0))
  assert plain[0] == shifted[0] == 1.0 and plain[-1] == shifted[-1] == 0.0
  assert (shifted[1:-1] > plain[1:-1]).all()


def test_tokenize_reports_truncation_and_keeps_the_template_end():
  from iomm_jax.models import iomm
  from iomm_jax.models.processor import Processor

  proc = Processor.tiny()
  full = proc.text_prompt_ids("a red circle above a blue square")
  tok = iomm.Tokenize(proc, len(full) - 2)
  ids, cut = tok.with_truncation("a red circle above a blue square")
  assert cut and len(ids) == len(full) - 2 and ids[-tok.suffix :] == full[-tok.suffix :]
  assert tok.with_truncation("a red circle") == (proc.text_prompt_ids("a red circle"), False)
