"""Mini-GenEval for the shapes world: detector, prompt set, scoring rules, validation on true renders, and the
sampling CLIs (the command line's flags and faults: tests/test_eval_shapes_cli.py)."""

import collections
import json

import numpy as np
import pytest
from PIL import Image

from iomm_jax import eval_shapes as ev
from iomm_jax import shapes_benchmark as bench
from iomm_jax import geneval_layout as layout
from iomm_jax import shapes_detector as sd
from iomm_jax.data import shapes

RES = 32


def test_render_objects_is_what_render_draws():
  for i in range(20):
    sc = shapes.scene(i, 3)
    img, _ = shapes.render(i, RES, 3)
    np.testing.assert_array_equal(shapes.render_objects(sc["objects"], RES, sc["background"]), img)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_detector_names_colour_shape_and_place(shape):
  rng = np.random.default_rng(len(shape))
  for colour in shapes.COLOURS:
    objs = [
        dict(shape=shape, colour=colour, x=0.3, y=0.7, r=0.12),
        dict(
            shape=shapes.SHAPES[shapes.SHAPES.index(shape) - 1],
            colour="black" if colour != "black" else "red",
            x=0.72,
            y=0.25,
            r=0.1,
        ),
    ]
    img = shapes.render_objects(objs, RES, tuple(rng.integers(205, 251, 3)))
    found = sorted(sd.detect(img), key=lambda d: d.x)
    assert [(d.colour, d.shape) for d in found] == [(o["colour"], o["shape"]) for o in objs]
    assert abs(found[0].x - 0.3) < 0.04 and abs(found[0].y - 0.7) < 0.06  # the triangle's centroid sits lower


def test_detector_accuracy_on_held_out_dataset_renders():
  acc = sd.accuracy(RES, num=80)
  assert acc["colour"] == 1.0 and acc["shape"] >= 0.98 and acc["image_exact"] >= 0.97, acc
  assert sd.detect(np.full((RES, RES, 3), 228, np.uint8)) == []


def test_prompt_set_is_fixed_balanced_and_in_the_worlds_language():
  ps = bench.prompt_set()
  assert ps == bench.prompt_set() and len(ps) == 72 and len({p["prompt"] for p in ps}) == 72
  assert collections.Counter(p["tag"] for p in ps) == bench.PROMPTS_PER_TAG
  rng = np.random.default_rng(0)
  for tag in bench.PROMPTS_PER_TAG:
    named = [o for p in ps if p["tag"] == tag for o in bench.parse_prompt(p["prompt"])[0]]
    for counts in (collections.Counter(c for c, _ in named), collections.Counter(s for _, s in named)):
      assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) in (6, 7), (tag, counts)
  for p in ps:
    sc = bench.scene_for(p["prompt"], rng)
    assert shapes.caption_of(sc["objects"]) == p["prompt"]  # the grammar the model was trained on


def test_geneval_phrasing_words_the_same_prompts_as_geneval_does(tmp_path, capsys):
  plain, geneval = bench.prompt_set(), bench.prompt_set("geneval")
  assert [p["include"] for p in geneval] == [p["include"] for p in plain]  # the same prompts, scored the same way
  assert all(p["prompt"].startswith("a photo of ") for p in geneval)
  assert [shapes.canonical_caption(p["prompt"]) for p in geneval] == [p["prompt"] for p in plain]
  words = " ".join(p["prompt"] for p in geneval)
  assert " left of " in words and " to the " not in words and " an orange " in words and " a orange " not in words
  assert bench.validate(RES, num=1, phrasing="geneval")["ground_truth"]["position"] == 1.0  # parsed, placed
  with pytest.raises(ValueError, match="phrasing='alt'"):
    bench.prompt_set("alt")
  assert ev.main([f"--write_prompts={tmp_path / 'p.jsonl'}", "--phrasing=geneval"]) == 0
  capsys.readouterr()
  written = [json.loads(x)["prompt"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
  assert written == [p["prompt"] for p in geneval]


def _o(colour, shape, x, y):
  return {"colour": colour, "shape": shape, "x": x, "y": y}


def test_scoring_rules():
  ps = {p["prompt"]: p for p in bench.prompt_set()}
  pos = next(p for p in ps.values() if p["tag"] == "position" and " above " in p["prompt"])
  (ca, sa), (cb, sb) = bench.parse_prompt(pos["prompt"])[0]  # "a {ca} {sa} above a {cb} {sb}"; y grows downwards
  assert bench.score(pos, [_o(ca, sa, 0.5, 0.2), _o(cb, sb, 0.45, 0.8)])["position"]
  assert bench.score(pos, [_o("red", sa, 0.5, 0.2), _o("red", sb, 0.45, 0.8)])["position"]  # classes only, as GenEval
  assert not bench.score(pos, [_o(ca, sa, 0.5, 0.8), _o(cb, sb, 0.45, 0.2)])["position"]
  assert not bench.score(pos, [_o(ca, sa, 0.2, 0.4), _o(cb, sb, 0.8, 0.5)])["position"]  # mostly beside: left of
  two = next(p for p in ps.values() if p["tag"] == "two_object")
  attr = next(p for p in ps.values() if p["tag"] == "colour_attr")
  for meta in (two, attr):
    (ca, sa), (cb, sb) = bench.parse_prompt(meta["prompt"])[0]
    right = [_o(ca, sa, 0.2, 0.2), _o(cb, sb, 0.8, 0.8)]
    swapped = [_o(cb, sa, 0.2, 0.2), _o(ca, sb, 0.8, 0.8)]
    assert bench.score(meta, right) == {meta["tag"]: True, "counting": True}
    assert bench.score(meta, swapped)[meta["tag"]] == (meta["tag"] == "two_object")  # colours only count in colour_attr
    assert not bench.score(meta, right[:1])[meta["tag"]]
    assert bench.score(meta, right + [_o("red", "star", 0.5, 0.5)]) == {meta["tag"]: True, "counting": False}
    many = right + [_o(c, "star", 0.1 * i, 0.5) for i, c in enumerate(("red", "green"))]
    assert not any(bench.score(meta, many).values())  # more objects than the world draws: not one of its scenes
  three = next(p for p in ps.values() if p["tag"] == "three_object")
  objs = [_o(c, s, x, 0.5) for (c, s), x in zip(bench.parse_prompt(three["prompt"])[0], (0.2, 0.5, 0.8))]
  assert bench.score(three, objs)["three_object"]
  assert not bench.score(three, [dict(o, x=1 - o["x"]) for o in objs])["three_object"]  # mirrored: order wrong
  single = next(p for p in ps.values() if p["tag"] == "single_object")
  ((c, s),) = bench.parse_prompt(single["prompt"])[0]
  other = shapes.SHAPES[shapes.SHAPES.index(s) - 1]
  assert bench.score(single, [_o(c, other, 0.5, 0.5)]) == {
      "single_object_shape": False,
      "single_object_colour": True,
      "counting": True,
  }
  assert bench.score(single, [_o("red" if c != "red" else "blue", s, 0.5, 0.5)])["single_object_shape"]


def test_counting_asks_for_every_object_the_include_entries_count():
  """An own-tag image is scored for counting against the sum of its entries' counts, not the number of entries."""
  meta = {
      "tag": "two_object",
      "include": [{"class": "circle", "count": 2}, {"class": "square", "count": 1}],
      "prompt": "two circles and a square",
  }
  three = [_o("red", "circle", 0.2, 0.5), _o("blue", "circle", 0.5, 0.5), _o("green", "square", 0.8, 0.5)]
  assert bench.score(meta, three) == {"two_object": True, "counting": True}
  assert bench.score(meta, three[1:]) == {"two_object": False, "counting": False}


def test_left_to_right_order_needs_distinct_places():
  """Three objects asked left to right: two at the same x are not in that order."""
  three = next(p for p in bench.prompt_set() if p["tag"] == "three_object")
  named = bench.parse_prompt(three["prompt"])[0]
  assert bench.score(three, [_o(c, s, x, 0.5) for (c, s), x in zip(named, (0.2, 0.5, 0.8))])["three_object"]
  tied = [_o(c, s, x, y) for (c, s), x, y in zip(named, (0.2, 0.5, 0.5), (0.5, 0.2, 0.8))]
  assert not bench.score(three, tied)["three_object"]


def test_chance_levels_match_the_dataset_distribution():
  ch = bench.chance(bench.prompt_set())
  # Objects per image are uniform on {1, 2, 3}; shapes are drawn with replacement, colours without.
  p_shape = np.mean([1 - (5 / 6) ** n for n in (1, 2, 3)])
  assert abs(ch["single_object_shape"] - p_shape) < 0.03
  assert abs(ch["single_object_colour"] - np.mean([n / 7 for n in (1, 2, 3)])) < 0.03
  assert abs(ch["counting"] - 1 / 3) < 0.03
  assert ch["three_object"] < 0.01 and ch["colour_attr"] < 0.01
  assert ch["overall"] == pytest.approx(np.mean([ch[c] for c in bench.CATEGORIES]))


def test_validation_true_renders_score_high_and_unrelated_ones_near_chance():
  v = bench.validate(RES, num=2)
  assert set(v["ground_truth"]) == set(bench.CATEGORIES) | {"overall"}
  for c in bench.CATEGORIES:
    assert v["ground_truth"][c] >= 0.95, (c, v["ground_truth"])
    assert abs(v["unrelated"][c] - v["chance"][c]) < 0.25, (c, v["unrelated"], v["chance"])
  assert v["unrelated"]["overall"] < 0.3


def test_noise_and_empty_backgrounds_score_no_better_than_chance():
  metadata = bench.prompt_set()
  rng = np.random.default_rng(0)
  ch = bench.chance(metadata)
  noise = [
      np.round((np.clip(rng.normal(0, 1, (2, RES, RES, 3)), -1, 1) + 1) * 127.5).astype(np.uint8) for _ in metadata
  ]
  blank = [np.broadcast_to(rng.integers(205, 251, (2, 1, 1, 3)), (2, RES, RES, 3)).astype(np.uint8) for _ in metadata]
  blobs = [
      np.repeat(np.repeat(rng.integers(0, 256, (2, 8, 8, 3)), RES // 8, 1), RES // 8, 2).astype(np.uint8)
      for _ in metadata
  ]
  for images in (noise, blank, blobs):
    res = bench.score_images(metadata, images)
    assert all(res["scores"][c] <= ch[c] + 0.05 for c in bench.CATEGORIES), res["scores"]
  assert bench.score_images(metadata, blank)["overall"] == 0.0


def test_scoring_a_folder_of_true_renders(tmp_path, capsys):
  ps = bench.prompt_set()
  metadata = [p for p in ps if p["tag"] == "position"][:3] + [p for p in ps if p["tag"] == "three_object"][:3]
  rng = np.random.default_rng(1)
  layout.write(
      tmp_path / "s",
      metadata,
      [np.stack([bench.render_prompt(m["prompt"], RES, rng) for _ in range(2)]) for m in metadata],
  )
  assert ev.main([f"--samples={tmp_path / 's'}"]) == 0
  line = capsys.readouterr().out.strip()
  assert "\n" not in line
  summary = json.loads(line)
  assert summary["scores"]["position"] == summary["scores"]["three_object"] == 1.0
  assert summary["counts"]["position"] == {"prompts": 3, "images": 6}
  full = json.loads((tmp_path / "s" / "eval_shapes.json").read_text())
  assert [p["prompt"] for p in full["per_prompt"]] == [m["prompt"] for m in metadata]
  assert full["picture_rows"] == [m["prompt"] for m in metadata[:2] + metadata[3:5]]
  assert Image.open(tmp_path / "s" / "eval_shapes.png").size[1] > 4 * 128
  # A sample that is not an image, or not at the folder's resolution: one line naming the file.
  sample = tmp_path / "s" / "00001" / "samples" / "0001.png"
  good = sample.read_bytes()
  sample.write_bytes(b"not a png")
  with pytest.raises(SystemExit, match=r"00001/samples/0001\.png: not a readable image"):
    ev.main([f"--samples={tmp_path / 's'}"])
  Image.new("RGB", (RES + 2, RES), "white").save(sample)
  with pytest.raises(SystemExit, match=rf"0001\.png is {RES + 2}×{RES}, the folder's samples {RES}×{RES}"):
    ev.main([f"--samples={tmp_path / 's'}"])
  sample.write_bytes(good)
  # Flags that only sampling reads, or a --workdir that is not a run, are refused rather than ignored or misfiled.
  for flags, message in (
      (["--uncond"], "; --uncond applies only when sampling"),
      (["--step=3", "--cfg", "2"], "; --step, --cfg apply only when sampling"),
      (["--num=7", "--seed", "5", "--no-ema"], "; --num, --seed, --use-ema/--no-ema apply only when sampling"),
      (["--nu", "7"], "; --num applies only when sampling"),  # argparse's abbreviation is the same flag
      (["--phrasing=geneval"], "; --phrasing applies only when sampling"),  # without --workdir it names nothing
      ([f"--workdir={tmp_path / 'typo'}"], "is not a training workdir (no config.json)"),
  ):
    with pytest.raises(SystemExit):
      ev.main([f"--samples={tmp_path / 's'}", *flags])
    assert message in capsys.readouterr().err
  assert not (tmp_path / "typo").exists()
  # A prompt with fewer samples than the others is scored on those it has, and said.
  sample.unlink()
  assert ev.main([f"--samples={tmp_path / 's'}"]) == 0
  out, err = capsys.readouterr()
  assert json.loads(out)["num_per_prompt"] == [1, 2] and "prompts have 1 to 2 samples" in err, err
  sample.write_bytes(good)
  (tmp_path / "s" / "00000" / "metadata.jsonl").write_text(json.dumps({"prompt": "a dog"}) + "\n")
  with pytest.raises(SystemExit, match=r"00000/metadata\.jsonl cannot be scored in the shapes world: no 'tag'"):
    ev.main([f"--samples={tmp_path / 's'}"])
  (tmp_path / "s" / "00000").rename(tmp_path / "s" / "7")  # GenEval reads any digit-named folder: named as it is
  with pytest.raises(SystemExit, match=rf"{tmp_path / 's' / '7' / 'metadata.jsonl'} cannot be scored"):
    ev.main([f"--samples={tmp_path / 's'}"])


# GenEval's own metadata over this world: its six tasks' tags, a single object without a colour, counting with an
# exclude entry, GenEval's colour and relation names.
_GENEVAL = [
    {"tag": "single_object", "include": [{"class": "star", "count": 1}], "prompt": "a photo of a star"},
    {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "green"}], "prompt": "a green circle"},
    {
        "tag": "color_attr",
        "include": [{"class": "square", "count": 1, "color": "red"}, {"class": "hexagon", "count": 1, "color": "blue"}],
        "prompt": "a photo of a red square and a blue hexagon",
    },
    {
        "tag": "counting",
        "include": [{"class": "triangle", "count": 2}],
        "exclude": [{"class": "triangle", "count": 3}],
        "prompt": "a photo of two triangles",
    },
    {
        "tag": "position",
        "include": [{"class": "diamond", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a circle left of a diamond",
    },
]


def test_geneval_metadata_scores_by_geneval_rules():
  single, colors, attr, counting, position = _GENEVAL
  assert bench.score(single, [_o("red", "star", 0.5, 0.5)]) == {"single_object_shape": True, "counting": True}
  assert not bench.score(single, [_o("red", "circle", 0.5, 0.5)])["single_object_shape"]
  assert bench.score(colors, [_o("green", "circle", 0.5, 0.5)]) == {"colors": True}
  assert bench.score(colors, [_o("green", "square", 0.5, 0.5), _o("red", "circle", 0.2, 0.2)]) == {"colors": False}
  assert bench.score(attr, [_o("red", "square", 0.2, 0.2), _o("blue", "hexagon", 0.8, 0.8)]) == {"color_attr": True}
  assert not bench.score(attr, [_o("blue", "square", 0.2, 0.2), _o("red", "hexagon", 0.8, 0.8)])["color_attr"]
  two = [_o("red", "triangle", 0.2, 0.2), _o("blue", "triangle", 0.8, 0.8)]
  assert bench.score(counting, two) == {"counting": True}
  assert not bench.score(counting, two[:1])["counting"]
  assert not bench.score(counting, two + [_o("black", "triangle", 0.5, 0.5)])["counting"]  # the exclude entry
  assert bench.score(counting, two + [_o("black", "star", 0.5, 0.5)])["counting"]  # other classes do not count
  assert bench.score(position, [_o("red", "circle", 0.2, 0.5), _o("blue", "diamond", 0.8, 0.55)])["position"]
  assert not bench.score(position, [_o("red", "circle", 0.8, 0.5), _o("blue", "diamond", 0.2, 0.55)])["position"]
  # GenEval's counting task replaces the every-image count, and overall is the mean over the tasks present.
  per_tag = [
      (single, [bench.score(single, [_o("red", "star", 0.5, 0.5), _o("red", "circle", 0.1, 0.1)])]),
      (counting, [bench.score(counting, two)]),
  ]
  scores, counts = bench._summarise(per_tag)
  assert scores == {"single_object_shape": 1.0, "counting": 1.0} and counts["counting"] == {"prompts": 1, "images": 1}
  for meta in _GENEVAL:
    bench.check_metadata(meta)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"include": [{"class": "bench", "count": 1}]}, r"include\[0\] class 'bench' is not a shape of this world"),
        ({"include": [{"class": "circle", "color": "pink"}]}, r"include\[0\] color 'pink' is not a colour"),
        ({"include": [{"class": "circle", "count": 4}]}, "asks for 4 objects; this world draws at most 3"),
        ({"include": [{"class": "circle", "count": 0}]}, r"include\[0\] count 0 is not a positive integer"),
        ({"exclude": [{"class": "dog", "count": 2}]}, r"exclude\[0\] class 'dog'"),
        ({"include": [{"class": "circle", "position": ["left of", 0]}]}, r"include\[0\] position \['left of', 0\]"),
        ({"include": []}, "has no 'include' list"),
    ],
)
def test_geneval_metadata_outside_the_world_is_named(change, message):
  with pytest.raises(ValueError, match=message):
    bench.check_metadata({"tag": "colors", "prompt": "x", "include": [{"class": "circle"}], **change})


def test_scoring_a_folder_of_geneval_metadata(tmp_path, capsys):
  """True renders of GenEval-tagged prompts score 1 in every task; one bad class stops the run naming the file."""
  bg = (230, 228, 226)
  scenes = [
      [_o("purple", "star", 0.5, 0.5)],
      [_o("green", "circle", 0.5, 0.5)],
      [_o("red", "square", 0.25, 0.25), _o("blue", "hexagon", 0.75, 0.75)],
      [_o("red", "triangle", 0.25, 0.3), _o("blue", "triangle", 0.75, 0.7)],
      [_o("black", "circle", 0.2, 0.5), _o("orange", "diamond", 0.8, 0.55)],
  ]
  images = []
  for objs in scenes:
    r = 0.3 if len(objs) == 1 else 0.15
    images.append(np.stack([shapes.render_objects([dict(o, r=r) for o in objs], RES, bg) for _ in range(2)]))
  layout.write(tmp_path / "g", _GENEVAL, images)
  assert ev.main([f"--samples={tmp_path / 'g'}"]) == 0
  summary = json.loads(capsys.readouterr().out.strip())
  assert summary["scores"] == {t: 1.0 for t in ("single_object_shape", "counting", "colors", "color_attr", "position")}
  assert summary["overall"] == 1.0 and set(summary["chance"]) >= set(summary["scores"])
  assert summary["chance"]["counting"] < 0.5
  (tmp_path / "g" / "00002" / "metadata.jsonl").write_text(
      json.dumps({"tag": "colors", "include": [{"class": "teddy bear", "count": 1}], "prompt": "a teddy bear"}) + "\n"
  )
  with pytest.raises(
      SystemExit,
      match=r"00002/metadata\.jsonl cannot be scored in the shapes world: include\[0\] "
      r"class 'teddy bear' is not a shape",
  ):
    ev.main([f"--samples={tmp_path / 'g'}"])


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
  """A workdir holding an untrained tiny model (step-0 checkpoint): no training step is compiled."""
  from helpers import tiny_config
  from iomm_jax.train import builder, checkpoint, loop

  work = tmp_path_factory.mktemp("untrained")
  c = tiny_config("short")
  loop.save_resolved_config(c, str(work))
  run = builder.build(c)
  ck = checkpoint.Checkpointer(str(work), with_data=False, async_save=False)
  ck.save(0, run.init_state(), config=json.loads(c.to_json_best_effort()), force=True)
  ck.close()
  return work, c.data.resolution


@pytest.mark.slow
def test_sample_cli_writes_the_geneval_layout(untrained, tmp_path, capsys):
  from iomm_jax import sample as sample_lib

  work, res = untrained
  prompts = tmp_path / "p.jsonl"
  meta = [{"prompt": "a red circle", "tag": "x", "include": []}, {"prompt": "a blue star above a green square"}]
  layout.write_prompts(prompts, meta)
  out = tmp_path / "geneval"
  assert sample_lib.main([f"--workdir={work}", f"--prompts_file={prompts}", "--num=2", f"--out={out}"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"][0]["prompts"] == 2
  got = layout.read(out)
  assert [(i, m, [p.name for p in pngs]) for i, m, pngs in got] == [
      (0, meta[0], ["0000.png", "0001.png"]),
      (1, meta[1], ["0000.png", "0001.png"]),
  ]
  assert Image.open(got[1][2][0]).size == (res, res)
  assert (out / "00001" / "grid.png").exists()


@pytest.mark.slow
def test_eval_shapes_cli_on_an_untrained_model(untrained, monkeypatch, capsys, tmp_path):
  from iomm_jax import sample as sample_lib

  work, res = untrained
  subset = [next(p for p in bench.prompt_set() if p["tag"] == t) for t in bench.TAGS]
  real_prompt_set = bench.prompt_set
  keep = [bench.prompt_set().index(m) for m in subset]  # 5 prompts keep the CPU test short
  monkeypatch.setattr(bench, "prompt_set", lambda phrasing="captions": [real_prompt_set(phrasing)[i] for i in keep])
  conditioned_on = []
  generate = sample_lib.generate

  def recording(*args, prompts, **kw):
    conditioned_on.append(prompts)
    return generate(*args, prompts=prompts, **kw)

  monkeypatch.setattr(sample_lib, "generate", recording)
  assert ev.main([f"--workdir={work}", "--num=2"]) == 0
  assert conditioned_on == [[m["prompt"]] * 2 for m in subset]  # one call per prompt, all its samples
  summary = json.loads(capsys.readouterr().out.strip())
  assert summary["checkpoint_step"] == 0 and summary["prompts"] == 5 and summary["resolution"] == res
  assert summary["overall"] <= summary["chance"]["overall"] + 0.1  # an untrained generator draws noise
  assert [m for _, m, _ in layout.read(work / "eval_shapes" / "samples")] == subset
  assert layout.read_prompts(work / "eval_shapes" / "samples" / "prompts.jsonl") == subset
  assert (work / "eval_shapes.json").exists() and (work / "eval_shapes.png").exists()
  assert ev.main([f"--workdir={work}", "--num=1", "--uncond"]) == 0
  uncond = json.loads(capsys.readouterr().out.strip())
  assert conditioned_on[len(subset) :] == [[""]] * len(subset)  # the condition dropped
  assert uncond["uncond"] and uncond["num_per_prompt"] == 1
  assert [m for _, m, _ in layout.read(work / "eval_shapes_uncond" / "samples")] == subset  # real prompts kept
  assert (work / "eval_shapes_uncond.json").exists()
  assert ev.main([f"--workdir={work}", "--num=1", "--phrasing=geneval"]) == 0
  worded = json.loads(capsys.readouterr().out.strip())
  assert conditioned_on[2 * len(subset) :] == [[shapes.geneval_phrase(m["prompt"])] for m in subset]
  assert worded["phrasing"] == "geneval" and worded["report"].endswith("eval_shapes_geneval.json")
  # An --out of the user's: the prompt set goes inside it; a prompts.jsonl beside it is not theirs to overwrite.
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "prompts.jsonl").write_text("my own file\n")
  for _ in range(2):  # the rerun replaces the earlier output, prompt set included
    assert ev.main([f"--workdir={work}", "--num=1", f"--out={mine / 's'}"]) == 0
  assert (mine / "prompts.jsonl").read_text() == "my own file\n"
  assert layout.read_prompts(mine / "s" / "prompts.jsonl") == subset
  assert [m for _, m, _ in layout.read(mine / "s")] == subset
  # --step picks the checkpoint (a damaged newest one's message sends users to it).
  with pytest.raises(SystemExit, match=r"--step=7: no such checkpoint .* it has steps \[0\]"):
    ev.main([f"--workdir={work}", "--num=1", "--step=7"])


def test_dominant_colour_diagnostic():
  """The shape-blind colour reading: the largest object's colour on a render, None on a bare background, and the
  diagnostic is reported beside the categories (not inside `overall`)."""
  from iomm_jax.data import shapes
  from iomm_jax import shapes_detector

  big = dict(shape="star", colour="purple", x=0.3, y=0.3, r=0.25)
  small = dict(shape="circle", colour="green", x=0.8, y=0.8, r=0.08)
  img = shapes.render_objects([big, small], 32, (230, 230, 230))
  assert shapes_detector.dominant_colour(img) == "purple"
  assert shapes_detector.dominant_colour(np.full((32, 32, 3), 230, np.uint8)) is None
  meta = [m for m in bench.prompt_set() if m["tag"] == "single_object"][:2]
  imgs = [
      np.stack([shapes.render_objects([dict(big, colour=m["include"][0]["color"])], 32, (230, 230, 230))] * 2)
      for m in meta
  ]
  res = bench.score_images(meta, imgs)
  assert res["diagnostics"] == {"single_object_dominant_colour": 1.0}
  assert abs(bench.chance(meta)["single_object_dominant_colour"] - 1 / 7) < 0.08


def test_detections_come_largest_first():
  """Scoring takes an entry's first `count` matches, and the dominant-colour diagnostic the first object: the
  detector lists objects by area, largest first, wherever they lie."""
  objs = [
      dict(shape="square", colour="blue", x=0.25, y=0.3, r=0.08),
      dict(shape="circle", colour="red", x=0.65, y=0.65, r=0.22),
  ]
  found = sd.detect(shapes.render_objects(objs, RES, (230, 230, 230)))
  assert [d.colour for d in found] == ["red", "blue"] and found[0].area > found[1].area
