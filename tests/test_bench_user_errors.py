"""The bench scripts meet a user's mistake as the apps do: a count below 1, a missing path or a bad --config is one
line and a non-zero exit status, refused before any work, without a traceback; the fault suite refuses a case it
does not know and fails when a case did not survive; every script imports this checkout's iomm_jax."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, ROOT)
from bench import _common, data, faults, mllm, prepare, study  # noqa: E402
from bench.gpu_sweep import PHASE_LOG  # noqa: E402


def _script(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
  return subprocess.run(
      [sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
  )


def _one_line(r: subprocess.CompletedProcess) -> str:
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, lines
  return lines[0]


@pytest.mark.parametrize(
    "script, args, flag",
    [
        ("step.py", ("--config=configs/tiny.py", "--steps=0"), "--steps=0"),  # was a StatisticsError after compiling
        ("oracle_condition.py", ("--config=configs/tiny.py", "--num=0"), "--num=0"),  # was an IndexError
        ("validation_cost.py", ("--steps=30", "--every=20"), "--every=20"),  # two evaluations: medians need a second
    ],
)
def test_an_absl_bench_refuses_a_count_at_start(script, args, flag):
  line = _one_line(_script(script, *args))
  assert flag in line and PHASE_LOG not in line


@pytest.mark.parametrize(
    "module, args, flag",
    [
        (prepare, ["--num", "0"], "--num"),  # was a ValueError after writing the images
        (data, ["--batch", "0"], "--batch"),  # was a ValueError from the pipeline
        (data, ["--workers", "0,-1"], "--workers"),
        (faults, ["--steps", "5"], "--steps"),  # the cases need two checkpoints, 5 steps apart
        (mllm, ["--runs", "0"], "--runs"),
        (study, ["--study=recipes", "--out={tmp}", "--eval_num=0"], "--eval_num"),
        (study, ["--study=recipes", "--out={tmp}", "--arms=6"], "--arms"),  # was an IndexError after training
    ],
)
def test_an_argparse_bench_refuses_a_count_before_any_work(module, args, flag, capsys, tmp_path):
  with pytest.raises(SystemExit) as e:
    module.main([a.format(tmp=tmp_path) for a in args])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert f"argument {flag}:" in err, err


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--config=configs/nope.py",), "config error: --config=configs/nope.py does not exist"),  # was an OSError
        (("--config=configs/tiny.py", "--config.train.lrr=1"), "config error: unknown config field config.train.lrr"),
    ],
)
def test_a_bad_config_is_one_line_without_a_traceback(args, expected):
  assert _one_line(_script("step.py", *args)).startswith(expected)


def test_data_bench_config_and_path_problems_are_one_line():
  for args, expected in [
      (["--config=configs/nope.py"], "config error: --config=configs/nope.py does not exist"),
      (["--config=configs/tiny.py", "--config.data.pathh=x"], "config error: unknown config field config.data.pathh"),
      (["--source", "arrayrecord", "--path", "/no/such/shards", "--workers", "0"], "error: no ArrayRecord shards"),
  ]:
    with pytest.raises(SystemExit) as e:
      _common.run(data.main, args)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), e.value


def test_a_missing_mllm_folder_is_one_line():  # was an MLLMCheckpointError traceback
  line = _one_line(_script("mllm_vision_probe.py", "--mllm", "/no/such/mllm"))
  assert line.startswith("error: MLLM path /no/such/mllm is not a directory")


def test_faults_refuses_an_unknown_case_before_the_reference_run(monkeypatch, capsys):
  monkeypatch.setattr(faults.Suite, "reference", lambda self: pytest.fail("the reference run started"))
  with pytest.raises(SystemExit) as e:
    faults.main(["--cases=nan,nope"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "argument --cases: unknown case nope; give one or more of nan, two_trainers," in err


def test_faults_exits_1_unless_every_case_survived(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(faults.Suite, "reference", lambda self: None)
  monkeypatch.setattr(faults.Suite, "nan", lambda self: self.cases.update(nan={"survived": False}))
  monkeypatch.setattr(faults.Suite, "odd_images", lambda self: self.cases.update(odd_images={"survived": True}))
  monkeypatch.setattr(faults.Suite, "full_disk", lambda self: self.cases.update(full_disk={"skipped": "no root"}))
  monkeypatch.setattr(faults.Suite, "sigterm", lambda self: 1 / 0)  # a case that crashes counts as not survived
  keep = str(tmp_path)
  assert faults.main(["--cases=odd_images,full_disk", f"--keep={keep}"]) == 0  # a skipped case does not fail it
  assert faults.main(["--cases=odd_images,nan", f"--keep={keep}"]) == 1
  assert faults.main(["--cases=odd_images,sigterm", f"--keep={keep}"]) == 1
  assert '"error": "ZeroDivisionError' in capsys.readouterr().out  # the JSON line is still printed


@pytest.mark.parametrize(
    "script, args",
    [("data.py", ("--source", "arrayrecord", "--path", "/no/such/shards", "--workers", "0")), ("prepare.py", ())],
)
def test_a_script_imports_this_checkouts_iomm_jax(tmp_path, script, args):
  """Another iomm_jax on the path (an installed one, a second checkout's) comes after this checkout's root."""
  other = tmp_path / "iomm_jax"
  other.mkdir()
  (other / "__init__.py").write_text("raise ImportError('the iomm_jax of another checkout')\n")
  r = _script(script, "--help" if not args else args[0], *args[1:], env={"PYTHONPATH": str(tmp_path)})
  assert "another checkout" not in r.stderr, r.stderr[-2000:]
