"""train/profiling.py: the step profiler writes a trace for exactly the configured steps; the compile-cache folder."""

import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest

from helpers import tiny_config
from iomm_jax.config import ConfigError
from iomm_jax.config_validation import validate
from iomm_jax.train import profiling


def test_profiler_traces_the_configured_steps_only(tmp_path):
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  x = jnp.ones((64, 64))
  prof = profiling.StepProfiler(2, 2, str(tmp_path / "profile"))
  active = []
  for step in range(6):
    prof.before(step)
    active.append(prof.active)
    x = f(x)
    prof.after(step + 1, x)
  prof.close()
  assert active == [False, False, True, True, False, False]
  assert glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  off = profiling.StepProfiler(0, 0, str(tmp_path / "none"))
  off.before(0)
  assert not off.active and not os.path.exists(tmp_path / "none")


def test_profile_folder_is_per_process_when_several_share_the_workdir():
  assert profiling.profile_dir("w", 0, 1) == os.path.join("w", "profile")
  assert profiling.profile_dir("w", 0, 2) == os.path.join("w", "profile", "process_0")
  assert profiling.profile_dir("w", 1, 2) == os.path.join("w", "profile", "process_1")


def test_compile_cache_folder_defaults_beside_the_workdir(tmp_path):
  work = str(tmp_path / "runs" / "tiny")
  assert profiling.compile_cache_dir("", work) == str(tmp_path / "runs" / "xla_cache")
  assert profiling.compile_cache_dir("", work + "/") == str(tmp_path / "runs" / "xla_cache")
  assert profiling.compile_cache_dir("off", work) is None
  assert profiling.compile_cache_dir(str(tmp_path / "c"), work) == str(tmp_path / "c")


@pytest.mark.parametrize("bad", [(1,), (-1, 2), (0.5, 1)])
def test_profile_steps_must_be_two_counts(bad):
  c = tiny_config()
  c.train.profile_steps = bad
  with pytest.raises(ConfigError, match="profile_steps"):
    validate(c)


def test_op_summary_reads_back_the_traced_ops(tmp_path):
  """The summary written after a trace names op kinds of the compiled program, each run once per traced step."""
  f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x + 1.0)
  x = jnp.ones((128, 128)) * 0.01
  hlo = f.lower(x).compile().as_text()
  prof = profiling.StepProfiler(1, 3, str(tmp_path / "profile"))
  y = x
  for step in range(5):
    prof.before(step, y)
    y = f(x)
    prof.after(step + 1, y)
  summary = json.load(open(tmp_path / "profile" / "op_summary.json"))
  assert summary == profiling.op_time_summary(str(tmp_path / "profile"), 3)
  assert summary["ops"] and summary["op_s_per_step"] > 0
  for op in summary["ops"]:
    assert re.search(rf"\b{re.escape(op['kind'])}(\.\d+)? = ", hlo), op["kind"]  # an instruction of the program
    assert op["per_step"] == int(op["per_step"]) >= 1  # the same ops every step: whole counts per step
    assert op["s_per_step"] > 0
  assert abs(sum(op["share"] for op in summary["ops"]) - 1.0) < 0.01  # a small program: every kind is in the top
  with pytest.raises(ValueError, match="steps=0"):
    profiling.op_time_summary(str(tmp_path / "profile"), 0)
  with pytest.raises(FileNotFoundError, match="no jax.profiler trace"):
    profiling.op_time_summary(str(tmp_path / "elsewhere"), 1)
