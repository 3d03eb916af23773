"""mini-GenEval's command line: what each mode reads, output paths refused before any work, and its report under
faults (a kill after the new samples, a full disk)."""

import json

import numpy as np
import pytest
from PIL import Image

from iomm_jax import eval_shapes as ev
from iomm_jax import geneval_layout as layout
from iomm_jax import shapes_benchmark as bench


def test_output_paths_that_cannot_be_written_are_one_line_before_any_work(tmp_path):
  (tmp_path / "dir").mkdir()
  (tmp_path / "file").write_text("x")
  with pytest.raises(SystemExit, match=r"^--write_prompts: .*dir is a folder; give a file path") as e:
    ev.main([f"--write_prompts={tmp_path / 'dir'}"])
  assert "\n" not in e.value.code
  with pytest.raises(SystemExit, match=r"^--write_prompts: .*file is a file, so"):
    ev.main([f"--write_prompts={tmp_path / 'file' / 'p.jsonl'}"])
  with pytest.raises(SystemExit, match=r"^--out: .*file is a file, so"):  # the workdir is not even read
    ev.main([f"--workdir={tmp_path / 'no_run'}", f"--out={tmp_path / 'file' / 'samples'}"])
  (tmp_path / "w" / "checkpoints" / "10").mkdir(parents=True)
  with pytest.raises(SystemExit, match=r"^--out: .*w holds 'checkpoints', not part of a sample folder"):
    ev.main([f"--workdir={tmp_path / 'no_run'}", f"--out={tmp_path / 'w'}"])
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
      "dir",
      "file",
      "w",
      "w/checkpoints",
      "w/checkpoints/10",
  ]


def _fake_model(monkeypatch, steps: list[int]):
  """eval_shapes' sampling with no model: each run loads the next step of `steps`, draws noise, 2 prompts."""
  from iomm_jax import sample as sample_lib

  subset = bench.prompt_set()[:2]
  monkeypatch.setattr(bench, "prompt_set", lambda phrasing="captions": subset)
  monkeypatch.setattr(ev.restore, "load_for_inference", lambda *a, **kw: (None, None, steps.pop(0)))
  rng = np.random.default_rng(0)
  monkeypatch.setattr(sample_lib, "generate", lambda run, params, *, prompts, **kw: rng.uniform(-1, 1, (1, 16, 16, 3)))
  return subset


def test_a_kill_after_new_samples_leaves_no_report_rather_than_the_old_one(tmp_path, monkeypatch, capsys):
  subset = _fake_model(monkeypatch, [10, 20, 20])
  work = tmp_path / "w"
  samples, report, picture = work / "eval_shapes" / "samples", work / "eval_shapes.json", work / "eval_shapes.png"
  assert ev.main([f"--workdir={work}", "--num=1"]) == 0
  assert json.loads(report.read_text())["checkpoint_step"] == 10 and picture.exists()
  swap_in, at_swap = layout.output_folder.swap_in, []

  def killed_after_swap(tmp, dst):
    at_swap.append((report.exists(), picture.exists(), (tmp / layout.PROMPTS_FILE).exists()))
    swap_in(tmp, dst)
    raise KeyboardInterrupt  # stopped before the new report is written

  monkeypatch.setattr(layout.output_folder, "swap_in", killed_after_swap)
  with pytest.raises(KeyboardInterrupt):
    ev.main([f"--workdir={work}", "--step=20", "--num=1"])
  assert at_swap == [(False, False, True)]  # the old report gone first; the prompt set inside the new samples
  assert not report.exists() and not picture.exists()  # step 20's samples never sit beside step 10's scores
  assert layout.read_prompts(samples / layout.PROMPTS_FILE) == subset
  monkeypatch.setattr(layout.output_folder, "swap_in", swap_in)
  assert ev.main([f"--workdir={work}", "--step=20", "--num=1"]) == 0
  assert json.loads(report.read_text())["checkpoint_step"] == 20 and picture.exists()
  assert sorted(p.name for p in work.iterdir()) == ["eval_shapes", "eval_shapes.json", "eval_shapes.png"]
  capsys.readouterr()


def test_a_kill_between_picture_and_report_of_a_samples_folder_leaves_no_old_report(tmp_path, monkeypatch):
  ps = bench.prompt_set()[:2]
  layout.write(tmp_path / "s", ps, [np.zeros((1, 16, 16, 3), np.uint8)] * 2)
  json_path, png_path = tmp_path / "r.json", tmp_path / "r.png"
  ev.report(str(tmp_path / "s"), str(json_path), str(png_path))
  old = json.loads(json_path.read_text())
  assert old["picture_rows"] == [m["prompt"] for m in ps]
  layout.write(tmp_path / "s", ps[:1], [np.zeros((1, 16, 16, 3), np.uint8)])  # the folder now holds other samples
  picture = ev.picture

  def killed_after_picture(rows, path):
    picture(rows, path)
    raise KeyboardInterrupt

  monkeypatch.setattr(ev, "picture", killed_after_picture)
  with pytest.raises(KeyboardInterrupt):
    ev.report(str(tmp_path / "s"), str(json_path), str(png_path))
  assert png_path.exists() and not json_path.exists()  # the new picture never sits beside the old folder's scores
  monkeypatch.setattr(ev, "picture", picture)
  assert ev.report(str(tmp_path / "s"), str(json_path), str(png_path))["prompts"] == 1
  assert json.loads(json_path.read_text())["picture_rows"] == [ps[0]["prompt"]]


def test_a_full_disk_while_writing_the_report_names_the_file(tmp_path, monkeypatch):
  import errno
  import pathlib

  ps = bench.prompt_set()[:2]
  layout.write(tmp_path / "s", ps, [np.zeros((1, 16, 16, 3), np.uint8)] * 2)
  full = OSError(errno.ENOSPC, "No space left on device")  # as Pillow and write_text raise it: no file named

  def no_space(*a, **kw):
    raise full

  with monkeypatch.context() as m:
    m.setattr(Image.Image, "save", no_space)
    with pytest.raises(OSError) as e:
      ev.report(str(tmp_path / "s"), str(tmp_path / "r.json"), str(tmp_path / "r.png"))
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "r.png")
  write_text = pathlib.Path.write_text
  monkeypatch.setattr(
      pathlib.Path, "write_text", lambda self, *a, **kw: no_space() if ".json" in self.name else write_text(self, *a)
  )
  with pytest.raises(OSError) as e:
    ev.report(str(tmp_path / "s"), str(tmp_path / "r.json"), str(tmp_path / "r.png"))
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "r.json")
  with pytest.raises(OSError) as e:
    layout.write_prompts(tmp_path / "p.json", ps)
  assert e.value.filename == str(tmp_path / "p.json")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png", "s"]  # no temporary file left


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--validate", "--workdir=w"], "--validate scores true renders (no model): it does not read --workdir"),
        (["--validate", "--samples=s"], "--validate and --samples are separate modes: give one"),
        (["--write_prompts=p.jsonl", "--validate"], "--write_prompts and --validate are separate modes"),
        (["--write_prompts=p.jsonl", "--num=3", "--workdir=w"], "exits: it does not read --workdir, --num"),
        (["--workdir=w", "--resolution=64"], "sampling a --workdir (--resolution is --validate's): it does not read"),
    ],
)
def test_flags_a_mode_would_ignore_are_refused(argv, message, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as e:
    ev.main(argv)
  assert e.value.code == 2 and message in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []  # no prompt file, no report
