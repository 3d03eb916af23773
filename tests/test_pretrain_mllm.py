"""The tiny world's MLLM: a short pre-training run captions better than chance; the folder it writes is a
transformers InternVL -hf folder (loads in transformers, passes `convert verify`, loads into IOMM); mismatched
folders fail at start naming the file and field."""

import json
import shutil

import numpy as np
import pytest

from helpers import load_config, run_app, tiny_config


@pytest.fixture(scope="module")
def mllm_dir(tmp_path_factory):
  """A short pre-training run (the ':short' variant, a little longer so that it learns colours)."""
  from iomm_jax.mllm_pretrain import trainer

  c = load_config("tiny_mllm", "short")
  c.unlock()
  c.train.num_steps, c.train.batch, c.train.lr, c.train.warmup_steps = 300, 32, 3e-3, 20
  c.data.num_images = 1024
  c.data.eval_num = 64
  out = tmp_path_factory.mktemp("mllm") / "tiny_mllm"
  report = trainer.pretrain(c, str(out))
  return out, report


@pytest.mark.slow
def test_short_run_captions_beat_chance(mllm_dir):
  out, report = mllm_dir
  held, chance = report["heldout"], report["chance"]
  # After 300 steps the colour of each object is named far above chance (1/7); the loss fell.
  assert held["colour"] > 2 * chance["colour"], held
  saved = json.loads((out / "mllm_pretrain.json").read_text())
  assert saved["history"][-1]["loss"] < 0.5 * saved["history"][0]["loss"]
  # The vision phase ran first and is reported; the held-out figures are also split by objects per scene.
  assert saved["vision_pretrain"]["steps"] == 60 and report["vision_pretrain"] == saved["vision_pretrain"]
  assert set(held["by_objects"]) == {"1", "2", "3"}
  assert sum(b["num_captions"] for b in held["by_objects"].values()) == held["num_captions"]
  assert saved["heldout"]["colour"] == held["colour"]


@pytest.mark.slow
def test_folder_is_an_internvl_hf_folder(mllm_dir):
  out, _ = mllm_dir
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
    assert (out / name).is_file(), name
  from iomm_jax.convert.internvl_verify import verify_mllm

  report = verify_mllm(out)
  assert report["passed"], report
  # The saved tokenizer is the built-in one: same ids for a caption and the image template.
  from iomm_jax.models.processor import Processor

  loaded, builtin = Processor.from_pretrained(out), Processor.tiny(num_image_tokens=16, image_size=64)
  assert loaded.text_prompt_ids("a red hexagon above a blue star") == builtin.text_prompt_ids(
      "a red hexagon above a blue star"
  )
  assert loaded.image_prompt_ids() == builtin.image_prompt_ids()
  assert loaded.tokenizer.unk_token_id not in loaded.text_prompt_ids("a red hexagon above a blue star")


@pytest.mark.slow
def test_iomm_loads_the_folder_through_mllm_path(mllm_dir):
  """model.mllm.path = the folder: the run's frozen MLLM holds the trained weights (LM head left out)."""
  out, _ = mllm_dir
  from iomm_jax.weights import io
  from iomm_jax.train import builder

  run = builder.build(tiny_config(model__mllm__path=str(out)))
  emb = np.asarray(run.frozen["mllm"]["language_model"]["embed_tokens"]["embedding"])
  want = dict(io.iter_tensors(out))["language_model.model.embed_tokens.weight"]
  np.testing.assert_array_equal(emb, want)
  assert "lm_head" not in run.frozen["mllm"]


def _edit_config(src, dst, edit):
  shutil.copytree(src, dst)
  cfg = json.loads((dst / "config.json").read_text())
  edit(cfg)
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


@pytest.mark.slow
def test_mismatched_folders_fail_at_start_naming_file_and_field(mllm_dir, tmp_path):
  from iomm_jax.models.internvl_keys import MLLMCheckpointError
  from iomm_jax.train import builder

  out, _ = mllm_dir

  def build(path, **kw):
    return builder.build(tiny_config(model__mllm__path=str(path), **kw), load_frozen=False)

  # Another model family.
  other = _edit_config(out, tmp_path / "llama", lambda c: c.update(model_type="llama"))
  with pytest.raises(MLLMCheckpointError, match=r"config\.json.*model_type"):
    build(other)
  # Weights saved for a smaller vocabulary than the tokenizer's.
  small = _edit_config(out, tmp_path / "vocab", lambda c: c["text_config"].update(vocab_size=50))
  with pytest.raises(MLLMCheckpointError, match=r"config\.json: text_config\.vocab_size=50"):
    build(small)
  # Trained for another image size than the run feeds the ViT.
  with pytest.raises(MLLMCheckpointError, match=r"vision_config\.image_size=64 but config\.data\.vit_size=56"):
    build(out, data__vit_size=56)
  # Not a folder of an MLLM at all.
  (tmp_path / "empty").mkdir()
  with pytest.raises(MLLMCheckpointError, match="has no config.json"):
    build(tmp_path / "empty")
  # A tokenizer missing or broken: the file is named, on one line.
  import shutil

  for name, damage, message in (
      ("notok", lambda f: f.unlink(), r"notok has no tokenizer\.json, so its tokenizer cannot be loaded"),
      ("badtok", lambda f: f.write_text("{"), r"badtok/tokenizer\.json is not valid JSON"),
  ):
    shutil.copytree(out, tmp_path / name)
    damage(tmp_path / name / "tokenizer.json")
    with pytest.raises(MLLMCheckpointError, match=message):
      build(tmp_path / name)
  # Weights cut short (an interrupted copy): found when the frozen MLLM is read, named, one error.

  cut = tmp_path / "cut"
  shutil.copytree(out, cut)
  data = (cut / "model.safetensors").read_bytes()
  (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(MLLMCheckpointError, match=r"cut/model\.safetensors cannot be read as a checkpoint"):
    builder.build(tiny_config(model__mllm__path=str(cut)))


def test_main_reports_a_bad_mllm_folder_in_one_line(tmp_path):
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
  r = run_app(
      "iomm_jax.main", "--config=configs/tiny.py:short", f"--workdir={tmp_path / 'w'}",
      f"--config.model.mllm.path={tmp_path / 'm'}",
  )  # fmt: skip
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "model_type" in r.stderr and "config.json" in r.stderr


def test_caption_accuracy_scores_attributes():
  from iomm_jax.mllm_pretrain import caption_accuracy as ca

  truth = [
      "a red circle above a blue square",
      "a green star",
      "a red circle, a blue square and a green triangle",
      "a black star to the left of a yellow circle",
  ]
  pred = [
      "a red circle below a blue star",
      "a green star",
      "a red circle , a blue square and a green triangle",
      "a yellow circle to the right of a black star",
  ]  # the same scene described from the other object
  s = ca.score(pred, truth)
  assert s["exact"] == pytest.approx(3 / 4)
  # Attributes match as multisets: a colour counts as often as both name it, and the chance levels are one in the
  # world's colours, shapes and relations.
  assert ca.score(["a red circle above a red circle"], ["a red star above a red square"])["colour"] == 1.0
  assert ca.score(["a red star"], ["a red star above a red square"])["colour"] == 0.5
  assert ca.chance_levels() == {"colour": 1 / 7, "shape": 1 / 6, "relation": 1 / 4}
  assert s["colour"] == 1.0
  assert s["shape"] == pytest.approx(7 / 8)
  assert s["relation"] == pytest.approx(1 / 2)
  by = ca.score_by_objects(pred, truth)
  assert sorted(by) == ["1", "2", "3"]
  assert by["1"]["num_captions"] == 1 and by["1"]["shape"] == 1.0
  assert by["2"]["num_captions"] == 2 and by["2"]["shape"] == pytest.approx(3 / 4)
  assert by["2"]["relation"] == pytest.approx(1 / 2) and by["3"]["exact"] == 1.0
  assert ca.parse("a black hexagon to the left of a yellow diamond") == {
      "objects": [("black", "hexagon"), ("yellow", "diamond")],
      "relation": "to the left of",
  }
  # Any phrasing of the world's captions reads as its plain form: a prefix is not an object, "left of" a relation.
  assert ca.parse("a photo of an orange hexagon left of a yellow diamond") == {
      "objects": [("orange", "hexagon"), ("yellow", "diamond")],
      "relation": "to the left of",
  }
  assert ca.score(["an image of a green star"], ["a green star"])["exact"] == 1.0


def test_training_sequences_mask_the_answer_and_the_said_caption():
  from iomm_jax.mllm_pretrain import examples
  from iomm_jax.models.processor import Processor

  p = Processor.tiny(num_image_tokens=16, image_size=64)
  b = examples.SequenceBuilder(p, 64)
  ids, loss = b.captioning("describe the image .", "a red circle")
  # Only the answer (caption + <|im_end|>) is trained in a captioning turn.
  assert p.tokenizer.decode([i for i, m in zip(ids, loss) if m]).split() == ["a", "red", "circle", "<|im_end|>"]
  assert sum(i == p.image_token_id for i in ids) == 16
  ids, loss = b.text_only("a blue star")
  trained = p.tokenizer.decode([i for i, m in zip(ids, loss) if m]).split()
  assert trained == ["a", "blue", "star", "a", "blue", "star", "<|im_end|>"]
  assert p.image_token_id not in ids
  # In a batch, every phrasing of a caption is answered in the plain grammar; the user's text-only words are kept.
  import numpy as np

  said = "a photo of an orange star left of a blue circle"
  for fraction, want_said in ((1.0, said.split()), (0.0, [])):
    batch = examples.make_batch(b, np.ones((1, 64, 64, 3), np.float32), [said], np.random.default_rng(0), fraction)
    trained = p.tokenizer.decode(batch.ids[0][batch.loss_mask[0]]).split()
    assert trained == want_said + "a orange star to the left of a blue circle <|im_end|>".split()
    assert (batch.pixels[0] == (fraction == 0.0)).all()  # a captioning turn keeps its image, text-only has none


def test_shapes_vocabulary_is_in_the_tiny_tokenizer():
  """Every colour and shape word of the shapes world has its own token (no <unk> in captions)."""
  from iomm_jax.data import shapes
  from iomm_jax.models.processor import Processor

  p = Processor.tiny()
  unk = p.tokenizer.unk_token_id
  prefixes = " ".join(shapes.PREFIXES).split()  # the captions' phrasings too
  for word in list(shapes.COLOURS) + list(shapes.SHAPES) + ["above", "below", "left", "right", "and", ","] + prefixes:
    assert unk not in p.tokenizer(word, add_special_tokens=False)["input_ids"], word


def test_out_that_this_command_did_not_write_is_refused_before_training(tmp_path):
  """--out is replaced when written: a file or a foreign non-empty folder (--out=runs) fails at start, untouched."""
  from iomm_jax.config import ConfigError
  from iomm_jax.mllm_pretrain import hf_folder, trainer

  runs = tmp_path / "runs"
  (runs / "tiny").mkdir(parents=True)
  (runs / "tiny" / "config.json").write_text("{}")
  c = load_config("tiny_mllm", "short")
  with pytest.raises(ConfigError, match=r"--out=.*runs is a non-empty folder that this command did not write"):
    trainer.pretrain(c, str(runs))
  assert (runs / "tiny" / "config.json").read_text() == "{}"
  with pytest.raises(ConfigError, match="exists and is not a folder"):
    hf_folder.check_replaceable(runs / "tiny" / "config.json")
  with pytest.raises(ConfigError, match="config.json is a file, so .* cannot be made"):  # refused before training
    hf_folder.check_replaceable(runs / "tiny" / "config.json" / "mllm")
  hf_folder.check_replaceable(tmp_path / "new")  # a new folder, an empty one, an earlier MLLM folder: fine
  (tmp_path / "empty").mkdir()
  hf_folder.check_replaceable(tmp_path / "empty")
  (tmp_path / "earlier").mkdir()
  (tmp_path / "earlier" / hf_folder.REPORT_FILE).write_text("{}")
  (tmp_path / "earlier" / "model.safetensors").write_text("")
  hf_folder.check_replaceable(tmp_path / "earlier")


def test_out_without_room_for_the_weights_is_refused_before_training(tmp_path, monkeypatch):
  """A filesystem with less free space than the fp32 weights: refused at start, not after minutes of training."""
  from iomm_jax import output_folder
  from iomm_jax.config import ConfigError
  from iomm_jax.mllm_pretrain import trainer, vision_pretrain

  monkeypatch.setattr(vision_pretrain, "pretrain_vision", lambda *a, **k: pytest.fail("training started"))
  c = load_config("tiny_mllm", "short")
  cfg, _ = trainer.model_config(c)
  need = trainer._weights_bytes(cfg)
  assert 1_000_000 < need < 2_000_000  # the tiny MLLM's 0.39M fp32 parameters
  small = type("Statvfs", (), {"f_bavail": 1, "f_frsize": need // 2})  # half the weights' bytes free
  monkeypatch.setattr(output_folder.os, "statvfs", lambda p: small)
  with pytest.raises(ConfigError, match=rf"has {need // 2:,} bytes free and the output needs at least {need:,}"):
    trainer.pretrain(c, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "section,field,value,needle",
    [
        ("data", "text_only_fraction", 1.5, r"data\.text_only_fraction=1\.5; it must be within \[0, 1\]"),
        ("data", "max_len", 8, r"a training sequence has \d+ tokens, more than data\.max_len=8"),
        ("arch.vision", "image_size", 60, r"config\.arch: InternVLConfig: the ViT grid 7"),
        ("arch.text", "hidden_size", 30, r"config\.arch: Qwen2Config: hidden_size=30"),
    ],
)
def test_config_mistakes_fail_before_any_training_naming_the_field(
    tmp_path, monkeypatch, section, field, value, needle
):
  from iomm_jax.config import ConfigError
  from iomm_jax.mllm_pretrain import trainer, vision_pretrain

  def no_training(*a, **k):
    raise AssertionError("the ViT phase started before the config was checked")

  monkeypatch.setattr(vision_pretrain, "pretrain_vision", no_training)
  c = load_config("tiny_mllm", "short")
  node = c
  for part in section.split("."):
    node = node[part]
  with c.unlocked():
    node[field] = value
  with pytest.raises(ConfigError, match=needle):
    trainer.pretrain(c, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
