"""GenEval's sample folder layout: exact names and contents, atomic writing, prompts files that fail by line."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from iomm_jax import geneval_layout as layout
from iomm_jax import sample as sample_lib

META = [
    {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1, "color": "red"}],
        "prompt": "a red circle",
        "extra": {"nested": [1, 2]},
    },
    {"prompt": "a blue square above a green star", "tag": "position", "note": "kept"},
]


def _images(n, side, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3)).astype(np.uint8)


def _entries(folder):
  return sorted(p.name for p in folder.iterdir())


def test_layout_is_written_exactly_as_geneval_reads_it(tmp_path):
  out = tmp_path / "samples"
  imgs = [_images(3, 24, 0), _images(3, 24, 1)]
  layout.write(out, META, imgs)
  assert _entries(out) == ["00000", "00001"]
  assert _entries(tmp_path) == ["samples"]  # no temporary folder left next to it
  for i, meta in enumerate(META):
    folder = out / f"{i:05d}"
    assert _entries(folder) == ["grid.png", "metadata.jsonl", "samples"]
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == meta  # every field kept, nothing added
    assert _entries(folder / "samples") == ["0000.png", "0001.png", "0002.png"]
    for n in range(3):
      png = Image.open(folder / "samples" / f"{n:04d}.png")
      assert png.size == (24, 24) and png.mode == "RGB"
      np.testing.assert_array_equal(np.asarray(png), imgs[i][n])
    grid = np.asarray(Image.open(folder / "grid.png"))
    assert grid.shape == (24 + 4, 3 * 26 + 2, 3)
    np.testing.assert_array_equal(grid[2:26, 28:52], imgs[i][1])  # second sample, after one 2-px gap
  read = layout.read(out)
  assert [(i, m, [p.name for p in pngs]) for i, m, pngs in read] == [
      (0, META[0], ["0000.png", "0001.png", "0002.png"]),
      (1, META[1], ["0000.png", "0001.png", "0002.png"]),
  ]


def test_rewriting_replaces_prompt_folders_drops_their_reports_and_keeps_the_callers_files(tmp_path):
  out = tmp_path / "samples"
  layout.write(out, [{"prompt": f"p{i}"} for i in range(5)], [_images(1, 8, i) for i in range(5)])
  (out / "eval_shapes.json").write_text("{}")  # `eval_shapes --samples` scored them: a report of samples now gone
  (out / "eval_shapes.png").write_text("picture")
  (out / "prompt_00.png").write_text("grid")  # `sample --prompt` wrote it there: its own, no report of these samples
  layout.write(out, META, [_images(2, 8, 0), _images(2, 8, 1)], also_own=sample_lib.GRID_FILES)
  assert _entries(out) == ["00000", "00001", "prompt_00.png"]
  assert (out / "prompt_00.png").read_text() == "grid"
  assert _entries(out / "00000" / "samples") == ["0000.png", "0001.png"]
  assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == META[1]
  assert _entries(tmp_path) == ["samples"]


def test_a_writers_reports_go_before_the_swap_and_its_prompt_set_with_the_samples(tmp_path, monkeypatch):
  out, report = tmp_path / "samples", tmp_path / "eval_shapes.json"
  layout.write(out, META, [_images(1, 8, 0), _images(1, 8, 1)])
  (out / layout.PROMPTS_FILE).write_text("old prompt set\n")
  report.write_text('{"checkpoint_step": 10}')
  swap_in, at_swap = layout.output_folder.swap_in, []

  def killed_after_swap(tmp, dst):
    at_swap.append((report.exists(), (tmp / layout.PROMPTS_FILE).exists()))
    swap_in(tmp, dst)
    raise KeyboardInterrupt  # stopped before the caller writes the new report

  monkeypatch.setattr(layout.output_folder, "swap_in", killed_after_swap)
  with pytest.raises(KeyboardInterrupt):
    with layout.Writer(out, (layout.PROMPTS_FILE,), reports=(report,)) as w:
      w.write_prompts(META[:1])
      w.add(0, META[0], _images(2, 8, 2))
  assert at_swap == [(False, True)]  # the old report gone first; the prompt set inside the folder swapped in
  assert not report.exists()  # new samples with no report, never with the old one
  assert _entries(out) == ["00000", layout.PROMPTS_FILE] and layout.read_prompts(out / layout.PROMPTS_FILE) == META[:1]
  assert _entries(tmp_path) == ["samples"]


# A kill of a GenEval writer: as tests/test_app_exit.py's, with the layout's writer.
WRITE_ONE = (
    "import numpy as np\n"
    "from iomm_jax import geneval_layout\n"
    "geneval_layout.write(sys.argv[2], [{'prompt': 'new'}], [np.zeros((1, 8, 8, 3), np.uint8)])\n"
)


def test_a_kill_between_the_swaps_renames_is_undone_by_the_next_writer(tmp_path, capsys):
  from test_app_exit import run_killed_after_rename

  out = tmp_path / "g"
  layout.write(out, META, [_images(1, 8, 0), _images(1, 8, 1)])
  r = run_killed_after_rename(WRITE_ONE, ".g.old-", str(out))
  assert r.returncode == -9, r.stderr
  assert not out.exists() and sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".g.old", ".g.tmp"]
  with layout.Writer(out) as w:  # the next writer puts the old samples back before anything else
    assert [m for _, m, _ in layout.read(out)] == META
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"note: {out} was missing" in err
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".g.tmp", "g"]  # its own; the dead one's went
    w.add(0, META[1], _images(1, 8, 2))
  assert [m for _, m, _ in layout.read(out)] == META[1:] and _entries(tmp_path) == ["g"]


def _tree(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_an_out_folder_holding_anything_else_is_refused_and_kept(tmp_path):
  layout.write(tmp_path / "s", META, [_images(1, 8, 0), _images(1, 8, 1)])
  cases = {
      "checkpoints": ["10/state/x", "20/state/x"],  # a workdir's numbered checkpoint folders
      "notes": ["notes.txt"],
      "extra": ["00000/metadata.jsonl", "00000/samples/0000.png", "00000/samples/mine.txt"],
      "nometa": ["00000/samples/0000.png"],
  }
  for name, files in cases.items():
    for f in files:
      (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
      (tmp_path / name / f).write_text("x")
    before = _tree(tmp_path / name)
    with pytest.raises(layout.OutputPathError, match=f"{name} holds '{files[0].split('/')[0]}'"):
      layout.write(tmp_path / name, META[:1], [_images(1, 8, 0)])
    assert _tree(tmp_path / name) == before, name  # nothing deleted, moved or added
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "extra", "nometa", "notes", "s"]
  # Its own earlier output (and files a caller names as its own) are replaced as before.
  (tmp_path / "s" / "prompt_00.png").write_text("grid")
  layout.write(tmp_path / "s", META[:1], [_images(2, 8, 2)], also_own=sample_lib.GRID_FILES)
  assert _entries(tmp_path / "s") == ["00000", "prompt_00.png"]


def test_sample_refuses_an_out_of_checkpoints_before_loading_the_model(tmp_path):
  ckpts = tmp_path / "w" / "checkpoints"
  for step in ("10", "20"):
    (ckpts / step).mkdir(parents=True)
    (ckpts / step / "_CHECKPOINT_METADATA").write_text("{}")
  prompts = layout.write_prompts(tmp_path / "p.jsonl", META)
  with pytest.raises(SystemExit) as e:  # the workdir has no config.json: only a check before the load can stop it
    sample_lib.main([f"--workdir={tmp_path / 'w'}", f"--prompts_file={prompts}", f"--out={ckpts}"])
  assert isinstance(e.value.code, str) and "\n" not in e.value.code
  assert f"--out: {ckpts} holds '10', not a GenEval sample folder" in e.value.code
  assert _tree(ckpts) == ["10", "10/_CHECKPOINT_METADATA", "20", "20/_CHECKPOINT_METADATA"]


def test_write_prompts_to_a_folder_or_under_a_file_leaves_nothing(tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "f").write_text("x")
  with pytest.raises(layout.OutputPathError, match="d is a folder; give a file path"):
    layout.write_prompts(tmp_path / "d", META)
  with pytest.raises(layout.OutputPathError, match="f is a file, so"):
    layout.write_prompts(tmp_path / "f" / "p.jsonl", META)
  assert _tree(tmp_path) == ["d", "f"]  # no temporary file left behind


def test_a_failed_write_leaves_nothing(tmp_path):
  out = tmp_path / "samples"
  with pytest.raises(RuntimeError, match="sampler died"):
    with layout.Writer(out) as w:
      w.add(0, META[0], _images(2, 8, 0))
      raise RuntimeError("sampler died")
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(ValueError, match="uint8"):
    layout.write(out, META[:1], [np.zeros((1, 8, 8, 3), np.float32)])
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(layout.OutputPathError, match=r"holds 'mine.txt'.* samples are kept in .*/\.samples\.kept-"):
    with layout.Writer(out) as w:
      w.add(0, META[0], _images(2, 8, 0))
      out.mkdir()
      (out / "mine.txt").write_text("put there while sampling")
  kept = next(tmp_path.glob(".samples.kept-*"))
  assert [m for _, m, _ in layout.read(kept)] == META[:1] and _entries(out) == ["mine.txt"]


def test_prompts_file_round_trip_keeps_order_and_fields(tmp_path):
  path = layout.write_prompts(tmp_path / "p.jsonl", META)
  assert layout.read_prompts(path) == META
  path.write_text(path.read_text() + "\n  \n")  # trailing blank lines are not prompts
  assert layout.read_prompts(path) == META


@pytest.mark.parametrize(
    "bad_line, lineno, message",
    [
        ("this is not json", 2, "not JSON"),
        ('["a red circle"]', 2, "not an object"),
        ('{"tag": "single_object"}', 3, r'no "prompt" field \(keys: \[\'tag\'\]\)'),
        ('{"prompt": 7}', 3, '"prompt" must be a string .*, not the int 7'),
    ],
)
def test_bad_prompts_file_names_the_line_and_writes_nothing(tmp_path, capsys, bad_line, lineno, message):
  lines = [json.dumps(META[0]), json.dumps(META[1]), json.dumps({"prompt": "a red star"})]
  lines.insert(lineno - 1, bad_line)
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(layout.PromptsFileError, match=rf"prompts\.jsonl:{lineno}: .*{message}"):
    layout.read_prompts(path)
  # The CLI stops with that one line before it loads any model (the workdir does not even exist) or writes.
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    sample_lib.main([f"--workdir={tmp_path / 'no_such_run'}", f"--prompts_file={path}", "--num=2", f"--out={out}"])
  assert isinstance(e.value.code, str) and "\n" not in e.value.code
  assert f"prompts.jsonl:{lineno}:" in e.value.code and re.search(message, e.value.code)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_a_prompts_file_with_a_byte_order_mark_is_read(tmp_path):
  (tmp_path / "p.jsonl").write_bytes('{"prompt": "a red circle"}\n'.encode("utf-8-sig"))  # as Windows editors save
  assert layout.read_prompts(tmp_path / "p.jsonl") == [{"prompt": "a red circle"}]


def test_empty_or_missing_prompts_file_is_an_error(tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(layout.PromptsFileError, match="no prompts"):
    layout.read_prompts(tmp_path / "empty.jsonl")
  with pytest.raises(layout.PromptsFileError, match="cannot read"):
    layout.read_prompts(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt=x", "--steps=0"], "--steps=0: give 1 or more Euler steps"),
        (["--prompt=x", "--edit=make it blue"], "--edit is an instruction for the --image inputs"),
        (["--edit=make it blue"], "--edit is an instruction for the --image inputs"),
        (["--prompt=x", "--use-ema", "--no-ema"], "argument --no-ema: not allowed with argument --use-ema"),
        (["--prompt=x", "--workdir={file}"], "file.txt is a file; give the folder a training run wrote"),
        (["--prompt=x", "--out={file}"], "exists and is not a folder"),
        (["--prompt=x", "--out={file}/sub"], "file.txt is a file, so"),
        (["--prompt=x", "--cfg=nan"], "--cfg=nan: give a finite guidance scale"),
        (["--prompt=x", "--prompts_file={file}", "--out=o"], "--out takes either --prompts_file's GenEval folder"),
    ],
)
def test_sample_argument_mistakes_fail_in_one_line_before_any_model_is_loaded(tmp_path, capsys, args, message):
  (tmp_path / "file.txt").write_text("x")
  args = [a.replace("{file}", str(tmp_path / "file.txt")) for a in args]
  with pytest.raises(SystemExit) as e:
    sample_lib.main([f"--workdir={tmp_path / 'no_such_run'}", *args])  # a missing workdir would fail later
  assert e.value.code == 2
  assert message in capsys.readouterr().err.strip().splitlines()[-1]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_prompt_folders_are_numbered_by_their_names_not_their_places(tmp_path):
  """GenEval numbers a prompt by its folder's name: folders 00002 and 7 are prompts 2 and 7, whatever else is there."""
  for name, prompt in (("00002", "a red circle"), ("7", "a blue square")):
    (tmp_path / name / "samples").mkdir(parents=True)
    (tmp_path / name / "metadata.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
  got = layout.read(tmp_path)
  assert [(i, m["prompt"]) for i, m, _ in got] == [(2, "a red circle"), (7, "a blue square")]
