"""A run's saved config names its files absolutely, so sample and the evaluators work from any directory; a workdir
that still names them relatively fails in one line saying so."""

import json
import os
import re

import pytest

from helpers import tiny_config
from iomm_jax import config as config_lib
from iomm_jax import config_validation
from iomm_jax.train import loop, restore


def test_every_path_like_field_is_a_path_field():
  """A new field that names a file must join PATH_FIELDS, or runs would save it relative again."""
  path_like = [f for f in config_validation.known_fields() if re.search(r"(path|workdir|_dir|_file)$", f)]
  assert path_like and set(path_like) <= set(config_lib.PATH_FIELDS)
  assert set(config_lib.PATH_FIELDS) <= set(config_validation.known_fields())


def test_with_absolute_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = tiny_config()
  c.model.mllm.path = "runs/tiny_mllm"
  c.init.workdir = "~/stage1"
  c.data.path = "gs://bucket/shards"
  out = config_lib.with_absolute_paths(c)
  assert out.model.mllm.path == str(tmp_path / "runs" / "tiny_mllm")
  assert out.init.workdir == os.path.join(os.path.expanduser("~"), "stage1")
  assert out.data.path == "gs://bucket/shards" and out.data.val_path == ""  # a URL and an unset field stay
  assert c.model.mllm.path == "runs/tiny_mllm"  # the run's own config is not changed
  assert out.train.lr == c.train.lr and out.sample.prompts == c.sample.prompts


def test_saved_config_has_absolute_paths_and_loads_back(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = tiny_config()
  c.model.mllm.path = "runs/tiny_mllm"
  work = tmp_path / "work"
  work.mkdir()
  loop.save_resolved_config(c, str(work))
  assert json.loads((work / "config.json").read_text())["model"]["mllm"]["path"] == str(tmp_path / "runs/tiny_mllm")
  assert restore.load_config(str(work)).model.mllm.path == str(tmp_path / "runs/tiny_mllm")


def test_a_relative_path_from_an_older_workdir_fails_in_one_line_naming_it(tmp_path, monkeypatch):
  c = tiny_config()
  c.model.mllm.path = "runs/tiny_mllm"  # as workdirs saved before 2026-12-06 hold it
  work = tmp_path / "work"
  work.mkdir()
  (work / "config.json").write_text(c.to_json_best_effort())
  (work / "checkpoints" / "20").mkdir(parents=True)  # a step folder, so the build (which reads the path) is reached
  monkeypatch.chdir(tmp_path)  # there is no runs/tiny_mllm here
  with pytest.raises(SystemExit) as e:
    restore.load_for_inference(str(work))
  msg = str(e.value)
  assert msg.startswith("error: MLLM path runs/tiny_mllm is not a directory") and "\n" not in msg
  assert "model.mllm.path='runs/tiny_mllm' relative to the directory its training started in" in msg


def test_a_workdir_holding_another_config_json_is_refused_untouched(tmp_path):
  """--workdir=runs/tiny_mllm (a model folder) must not have its config.json overwritten by the run's."""
  model = tmp_path / "tiny_mllm"
  model.mkdir()
  (model / "config.json").write_text('{"model_type": "internvl"}')
  with pytest.raises(SystemExit, match="holds a config.json that is not a training run's"):
    loop.train(tiny_config(), str(model))
  assert (model / "config.json").read_text() == '{"model_type": "internvl"}' and len(list(model.iterdir())) == 1
  run = tmp_path / "run"
  run.mkdir()
  loop.save_resolved_config(tiny_config(), str(run))
  loop.check_workdir(str(run))  # a run's own config.json: the rerun resumes there
  assert [p.name for p in run.iterdir()] == ["config.json"]


@pytest.mark.parametrize("cut", ["truncated", "empty", "edited"])
def test_a_config_json_cut_short_or_edited_is_one_line_naming_the_file_the_position_and_the_fix(tmp_path, cut):
  """sample, the evaluators (restore.load_config / load_for_inference) and a rerun of training: one line, no
  JSONDecodeError traceback, and nothing in the workdir changed."""
  work = tmp_path / "work"
  work.mkdir()
  loop.save_resolved_config(tiny_config(), str(work))
  text = (work / "config.json").read_text()
  bad = {"truncated": text[:300], "empty": "", "edited": text.replace('"seed": 0', '"seed": 0,,', 1)}[cut]
  (work / "config.json").write_text(bad)
  path = work / "config.json"
  want = {"truncated": r"is not valid JSON at line \d+ column \d+ \(char \d+ of 300:", "empty": "is empty"}
  for call in (restore.load_config, restore.load_for_inference):
    with pytest.raises(SystemExit) as e:
      call(str(work))
    msg = str(e.value)
    assert msg.startswith(f"error: {path} is ") and "\n" not in msg, msg
    assert re.search(want.get(cut, r"is not valid JSON at line \d+ column \d+"), msg), msg
    assert "restore it from a backup, or delete it" in msg  # no checkpoint yet that keeps a copy
  with pytest.raises(SystemExit, match=re.escape(f"error: {path} is ")):
    loop.train(tiny_config(), str(work))
  assert (work / "config.json").read_text() == bad and [p.name for p in work.iterdir()] == ["config.json"]
  # With a checkpoint, the fix is the copy of the config it was saved with.
  copy = work / "checkpoints" / "20" / "config" / "metadata"
  copy.parent.mkdir(parents=True)
  copy.write_text(text)
  with pytest.raises(
      SystemExit, match=re.escape(f"copy the config its newest checkpoint was saved with over it ({copy})")
  ):
    restore.load_config(str(work))


@pytest.mark.parametrize(
    "section,field,value,needle",
    [
        ("sample", "steps", "many", "config.sample.steps is 'many', where the schema holds int values (default 50)"),
        ("sample", "use_ema", 1, "config.sample.use_ema is 1, where the schema holds bool values"),
        ("train", "lr", "fast", "config.train.lr is 'fast', where the schema holds float values"),
        ("mesh", "rules", 3, "config.mesh.rules is 3, where the schema holds tuple values"),
        ("model", "dit", "mmdit", "config.model.dit is 'mmdit', where a section is expected"),
    ],
)
def test_a_config_json_field_edited_to_another_type_is_one_line_naming_it(tmp_path, section, field, value, needle):
  work = tmp_path / "work"
  work.mkdir()
  loop.save_resolved_config(tiny_config(), str(work))
  saved = json.loads((work / "config.json").read_text())
  saved[section][field] = value
  (work / "config.json").write_text(json.dumps(saved))
  with pytest.raises(SystemExit) as e:
    restore.load_config(str(work))
  msg = str(e.value)
  assert msg.startswith(f"error: {work / 'config.json'}: {needle}") and "\n" not in msg, msg


def test_a_config_json_value_outside_its_list_or_a_folder_in_its_place_is_one_line(tmp_path):
  work = tmp_path / "work"
  work.mkdir()
  loop.save_resolved_config(tiny_config(), str(work))
  saved = json.loads((work / "config.json").read_text())
  saved["model"]["dit"]["kind"] = "bogus"
  (work / "config.json").write_text(json.dumps(saved))
  with pytest.raises(SystemExit, match=r"config\.model\.dit\.kind='bogus' is not one of \('mmdit', 's3dit'\)"):
    restore.load_config(str(work))
  (work / "config.json").unlink()
  (work / "config.json").mkdir()
  with pytest.raises(SystemExit, match=re.escape(f"error: {work / 'config.json'} is a folder, not the run's config")):
    restore.load_config(str(work))
  with pytest.raises(SystemExit, match=re.escape(f"{work / 'config.json'} is not a file")):
    loop.train(tiny_config(), str(work))
  assert sorted(p.name for p in work.iterdir()) == ["config.json"]  # nothing written beside it


@pytest.mark.slow
def test_sample_reports_a_cut_short_config_json_in_one_line(tmp_path):
  from helpers import run_app

  work = tmp_path / "work"
  work.mkdir()
  loop.save_resolved_config(tiny_config(), str(work))
  (work / "config.json").write_text((work / "config.json").read_text()[:200])
  r = run_app("iomm_jax.sample", f"--workdir={work}", "--prompt=a red circle", f"--out={tmp_path / 'out'}")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith(f"error: {work / 'config.json'} is not valid JSON at line")


def test_a_run_trained_on_another_device_count_loads_for_inference_on_these(tmp_path, capsys):
  """A run saved with a mesh for 4 devices, loaded where 8 are (tests') : the apps rebuild it data-parallel, with a
  note, rather than failing on a mesh they offer no flag to change; here it gets as far as the missing checkpoint."""
  work = tmp_path / "work"
  work.mkdir()
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 1
  loop.save_resolved_config(config, str(work))
  with pytest.raises(restore.RunRestoreError, match="no checkpoint under"):
    restore.restore_run(str(work), load_frozen=False)
  err = capsys.readouterr().err
  assert "uses 4 devices but 8 are available" in err and "loading it data-parallel on 8 device(s)" in err, err


def test_the_apps_refuse_a_model_folder_and_a_run_without_checkpoints_before_building(tmp_path, monkeypatch):
  """sample / the evaluators given the MLLM's folder, or a run that never saved, answer at once in one line: the
  model (minutes to build for a real MLLM) is not built for either."""
  from iomm_jax.train import builder

  monkeypatch.setattr(builder, "build", lambda *a, **k: pytest.fail("the model was built"))
  model = tmp_path / "tiny_mllm"
  model.mkdir()
  (model / "config.json").write_text(
      '{"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl"}'
  )
  with pytest.raises(SystemExit) as e:
    restore.load_for_inference(str(model))
  msg = str(e.value)
  assert msg.startswith(f"error: {model / 'config.json'} is not a training run's config") and "\n" not in msg, msg
  run = tmp_path / "run"
  run.mkdir()
  loop.save_resolved_config(tiny_config(), str(run))
  with pytest.raises(SystemExit, match=r"^error: no checkpoint under .*run/checkpoints; train first"):
    restore.load_for_inference(str(run))


@pytest.mark.parametrize("what", ["checkpoints file", "samples file", "metrics row"])
def test_a_workdir_the_run_would_fail_in_later_is_refused_at_start(tmp_path, what):
  """A file where the run makes a folder failed at the first save, after the training (blamed on disk space); a
  hand-edited metrics row, after the model was built and restored. Both now stop the start, naming the path."""
  run = tmp_path / "run"
  run.mkdir()
  if what == "metrics row":
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\ngarbage\n{"step": 2, "loss": 0.4}\n')
    want = f"error: {run / 'metrics.jsonl'}:2: not a metrics row"
  else:
    name = what.split()[0]
    (run / name).write_text("")
    want = f"--workdir='{run}': {run / name} is not a folder"
  with pytest.raises(SystemExit) as e:
    loop.check_workdir(str(run))
  assert str(e.value).startswith(want) and "\n" not in str(e.value), e.value
