"""Mistakes a person can act on: an unknown config field, a config or data that cannot be used (one line, nothing
written), prompts the tokenizer cuts or drops."""

import pytest

from helpers import run_app
from iomm_jax import config_validation
from iomm_jax.train.user_errors import USER_ERRORS

# ---- errors a person can act on ---------------------------------------------------------------------------------


def test_unknown_config_field_names_nearest():
  msg = config_validation.unknown_field_message("train.lrr")
  assert msg.startswith("unknown config field config.train.lrr") and "config.train.lr" in msg
  assert "config.train.on_nonfinite" in config_validation.unknown_field_message("train.nonexistent")


@pytest.mark.slow
def test_main_config_errors_are_one_line():
  for args, want in (
      (["--config=configs/tiny.py", "--config.train.nonexistent=1"], "config.train.nonexistent"),
      (["--config=configs/tiny.py", "--config.train.lr=abc"], "could not convert"),
      (["--config=configs/no_such.py"], "no_such.py"),
      (["--config=configs/tiny.py", "--config.train.on_nonfinite=maybe"], "on_nonfinite"),
      (["--config=configs/tiny.py", "--max_steps=-3"], "--max_steps=-3: -3 is not a positive integer"),
      (["--config=configs/tiny.py", "--config.train.lr", "--workdir=w"], "flag --config.train.lr"),
  ):
    r = run_app("iomm_jax.main", *args, "--workdir=/nonexistent/x")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    kind = "error:" if "--max_steps" in want else "config error:"  # another flag's mistake is not the config's
    assert lines[-1].startswith(kind) and want in lines[-1], r.stderr[-2000:]


def _unreadable_data(tmp_path, kind):
  """(data.source, data.path) of training data that cannot be used, of the given kind."""
  if kind == "missing folder":
    return "folder", tmp_path / "nope"
  if kind == "empty folder":
    (tmp_path / "empty").mkdir()
    return "folder", tmp_path / "empty"
  if kind == "zero-byte images":
    (tmp_path / "zero").mkdir()
    for i in range(3):
      (tmp_path / "zero" / f"{i}.png").write_bytes(b"")
    return "folder", tmp_path / "zero"
  if kind == "missing jsonl":
    return "jsonl", tmp_path / "nope.jsonl"
  if kind == "arrayrecord without records":
    from array_record.python import array_record_module as ar

    (tmp_path / "shards").mkdir()
    ar.ArrayRecordWriter(str(tmp_path / "shards" / "a.array_record"), "group_size:1").close()
    return "arrayrecord", tmp_path / "shards"
  raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["missing folder", "empty folder", "zero-byte images", "missing jsonl", "arrayrecord without records"]
)
def test_data_that_cannot_be_used_stops_the_run_in_one_line_before_the_workdir_is_written(tmp_path, kind):
  from helpers import tiny_config
  from iomm_jax.train import loop

  source, path = _unreadable_data(tmp_path, kind)
  work = tmp_path / "work"
  with pytest.raises(USER_ERRORS) as e:  # main prints these as one line, without a traceback
    loop.train(tiny_config("pretrain,short", data__source=source, data__path=str(path)), str(work))
  msg = str(e.value)
  assert "data.path" in msg and str(path) in msg and "\n" not in msg, msg
  assert list(work.iterdir()) == [], "no config.json, tensorboard/ or metrics for a run that cannot read its data"


@pytest.mark.slow
def test_main_data_errors_are_one_line_and_write_nothing(tmp_path):
  work = tmp_path / "work"
  r = run_app(
      "iomm_jax.main",
      "--config=configs/tiny.py:pretrain,short",
      "--config.data.source=arrayrecord",
      f"--config.data.path={tmp_path / 'no_shards'}",
      f"--workdir={work}",
  )
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  lines = [x for x in r.stderr.splitlines() if x.strip()]
  assert lines[-1].startswith("error: no ArrayRecord shards at") and "data.path" in lines[-1], r.stderr[-2000:]
  assert not work.exists() or list(work.iterdir()) == []


def test_sample_prompt_notes():
  from iomm_jax.train.generate import prompt_notes

  class Proc:

    def text_prompt_ids(self, text):
      return [1, 2] + [7] * len(text.split()) + [3]

  class Tok:
    processor, max_len = Proc(), 8

  notes = prompt_notes(Tok(), ["a red circle", "", "w " * 20])
  assert len(notes) == 2
  assert "prompt 1 is empty" in notes[0] and "unconditional" in notes[0]
  assert "prompt 2" in notes[1] and "23 template tokens" in notes[1] and "first 8" in notes[1]


def test_a_failed_write_outside_a_checkpoint_ends_training_in_one_line(tmp_path):
  """config.json or a sample grid that cannot be written (a full disk) was a traceback; now one line naming the file,
  and the rerun resumes from the newest checkpoint, which a failed save never replaces."""
  import subprocess
  import sys

  from helpers import ROOT

  code = (
      "import sys\n"
      "from iomm_jax.train import loop\n"
      "def full(*a, **k):\n"
      "  raise OSError(28, 'No space left on device', '/w/samples/step_0000015.png')\n"
      "loop.train = full\n"
      "from iomm_jax import main\n"
      f"sys.argv = ['main', '--config=configs/tiny.py:pretrain,short', '--workdir={tmp_path / 'w'}']\n"
      "sys.exit(main.run())\n"
  )
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "error: /w/samples/step_0000015.png: No space left on device (free some space, or write the output "
      "elsewhere); then rerun the same command, which resumes"
  )
