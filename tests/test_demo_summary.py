"""The demo's closing figures: read from the files each step wrote, each beside its chance level or target."""

import json

import pytest

from iomm_jax import demo_summary


def test_summary_reads_every_figure_and_marks_targets(tmp_path, capsys):
  mllm, work = tmp_path / "mllm", tmp_path / "run"
  mllm.mkdir()
  work.mkdir()
  (mllm / "mllm_pretrain.json").write_text(
      json.dumps(
          {
              "heldout": {
                  "exact": 0.5,
                  "colour": 0.97,
                  "shape": 0.6,
                  "relation": 0.4,
                  "examples": [],
                  "by_objects": {"1": {"shape": 0.3}, "2": {"shape": 0.7}},
              },
              "chance": {"colour": 1 / 7, "shape": 1 / 6, "relation": 0.25},
              "steps": 1234,
          }
      )
  )
  (work / "recon.json").write_text(json.dumps({"margin": 2.5, "top1_retrieval": 0.5, "num": 16}))
  # The stages' step counts: the fine-tuned run's last training row, and stage 1's through its config.init.workdir.
  stage1 = tmp_path / "stage1"
  stage1.mkdir()
  (stage1 / "metrics.jsonl").write_text('{"step": 25, "loss": 0.1}\n{"step": 4010, "loss": 0.05}\n')
  # Stage 1's text-prompt figures (before any caption): the single-object ones, beside their chance levels.
  (stage1 / "eval_shapes.json").write_text(
      json.dumps(
          {
              "scores": {"single_object_colour": 0.6, "single_object_shape": 0.2, "position": 0.0},
              "overall": 0.18,
              "diagnostics": {"single_object_dominant_colour": 0.9},
              "chance": {"single_object_colour": 0.29, "single_object_shape": 0.3},
          }
      )
  )
  (work / "config.json").write_text(json.dumps({"init": {"workdir": str(stage1)}}))
  (work / "metrics.jsonl").write_text('{"step": 1990, "loss": 0.04}\n{"step": 1990, "val_loss": 0.2}\n')
  (work / "eval_shapes.json").write_text(
      json.dumps(
          {
              "scores": {"single_object_colour": 0.95, "position": 0.25},
              "overall": 0.61,
              "chance": {"single_object_colour": 0.29, "position": 0.01, "overall": 0.14},
          }
      )
  )
  assert demo_summary.main(["--mllm", str(mllm), "--workdir", str(work)]) == 0
  out = capsys.readouterr().out.splitlines()
  figures = json.loads(out[-1])
  assert figures["mllm"]["shape"] == 0.6 and figures["recon"]["margin"] == 2.5
  assert figures["training"] == {"mllm_steps": 1234, "stage1_steps": 4010, "stage2_steps": 1990}
  assert figures["geneval"] == {"single_object_colour": 0.95, "position": 0.25, "overall": 0.61}
  lines = {line.split()[0]: line for line in out[1:-1]}
  assert lines["recon.margin"].endswith("ok") and lines["recon.top1_retrieval"].endswith("below target")
  assert "chance 0.29" in lines["geneval.single_object_colour"] and lines["geneval.position"].endswith("below target")
  assert "chance 0.17" in lines["mllm.shape"]
  assert figures["mllm"]["single_object_shape"] == 0.3 and "chance 0.17" in lines["mllm.single_object_shape"]
  assert lines["training.stage1_steps"].split()[1] == "4010"
  assert figures["geneval_stage1"] == {
      "single_object_colour": 0.6,
      "single_object_shape": 0.2,
      "overall": 0.18,
      "single_object_dominant_colour": 0.9,
  }
  assert "no caption seen" in lines["geneval_stage1.single_object_colour"]
  assert "chance 0.29" in lines["geneval_stage1.single_object_colour"]
  assert "target" not in lines["geneval_stage1.overall"] and "no caption" not in lines["geneval.overall"]


def test_summary_of_a_partial_demo_lists_what_exists(tmp_path, capsys):
  (tmp_path / "recon.json").write_text(json.dumps({"margin": 1.0, "top1_retrieval": 0.1}))
  assert demo_summary.main(["--mllm", str(tmp_path / "none"), "--workdir", str(tmp_path)]) == 0
  out, err = capsys.readouterr()
  assert json.loads(out.splitlines()[-1]) == {"recon": {"margin": 1.0, "top1_retrieval": 0.1}}
  assert f"note: --mllm={tmp_path / 'none'} does not exist" in err  # what is missing is named


def test_summary_with_nothing_to_show_names_what_each_path_lacks(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    demo_summary.main(["--mllm", str(tmp_path / "nonexistent"), "--workdir", str(tmp_path / "nonexistent2")])
  line = e.value.code
  assert isinstance(line, str) and "\n" not in line
  assert f"--mllm={tmp_path / 'nonexistent'} does not exist" in line and "mllm_pretrain.json" in line
  assert f"--workdir={tmp_path / 'nonexistent2'} does not exist" in line
  assert "demo figures" not in capsys.readouterr().out
  # The two swapped: each holds what the other should.
  mllm, work = tmp_path / "mllm", tmp_path / "run"
  (mllm).mkdir()
  (mllm / "mllm_pretrain.json").write_text(json.dumps({"heldout": {}, "steps": 3}))
  (work / "checkpoints").mkdir(parents=True)
  (work / "config.json").write_text("{}")
  with pytest.raises(SystemExit, match="is the MLLM folder .*; were --mllm and --workdir swapped"):
    demo_summary.main(["--mllm", str(work), "--workdir", str(mllm)])


@pytest.mark.parametrize("name", ["config.json", "recon.json"])
def test_a_file_cut_short_stops_the_summary_in_one_line_naming_it(tmp_path, name):
  (tmp_path / "recon.json").write_text(json.dumps({"margin": 1.0, "top1_retrieval": 0.1}))
  (tmp_path / "config.json").write_text(json.dumps({"init": {"workdir": ""}}))
  (tmp_path / name).write_text('{"init": {"work')
  with pytest.raises(SystemExit) as e:
    demo_summary.main(["--mllm", str(tmp_path / "none"), "--workdir", str(tmp_path)])
  line = e.value.code
  assert isinstance(line, str) and "\n" not in line and str(tmp_path / name) in line, line


@pytest.mark.parametrize(
    "folder,name,content",
    [
        ("mllm", "mllm_pretrain.json", {"heldout": 5}),
        ("run", "recon.json", [1, 2]),
        ("run", "eval_shapes.json", {"overall": 0.2}),
        ("run", "config.json", {"init": "stage1"}),
    ],
)
def test_a_report_of_another_shape_stops_the_summary_in_one_line_naming_it(tmp_path, folder, name, content):
  for d in ("mllm", "run"):
    (tmp_path / d).mkdir()
  (tmp_path / "run" / "config.json").write_text(json.dumps({"init": {"workdir": ""}}))
  (tmp_path / folder / name).write_text(json.dumps(content))
  with pytest.raises(SystemExit) as e:
    demo_summary.main(["--mllm", str(tmp_path / "mllm"), "--workdir", str(tmp_path / "run")])
  line = e.value.code
  assert isinstance(line, str) and "\n" not in line and line.startswith(f"demo_summary: {tmp_path / folder / name}")
  assert "does not hold the fields the summary reads" in line
