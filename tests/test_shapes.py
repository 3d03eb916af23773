"""Procedural shapes: determinism, variety, captions that match the pixels, atomic folder writing."""

import json
import re

import numpy as np
import pytest

from iomm_jax.data import shapes

RES = 64


def test_render_is_a_pure_function_of_index_and_seed():
  a, ca = shapes.render(7, RES, seed=3)
  b, cb = shapes.render(7, RES, seed=3)
  assert a.dtype == np.uint8 and a.shape == (RES, RES, 3)
  np.testing.assert_array_equal(a, b)
  assert ca == cb
  assert not np.array_equal(a, shapes.render(8, RES, seed=3)[0])
  assert not np.array_equal(a, shapes.render(7, RES, seed=4)[0])


def test_variety_of_shapes_colours_and_counts():
  scenes = [shapes.scene(i, 0) for i in range(300)]
  kinds = {o["shape"] for s in scenes for o in s["objects"]}
  colours = {o["colour"] for s in scenes for o in s["objects"]}
  counts = {len(s["objects"]) for s in scenes}
  assert len(kinds) >= 3 and {"circle", "square", "triangle"} <= kinds
  assert len(colours) >= 6
  assert counts == {1, 2, 3}
  backgrounds = {s["background"] for s in scenes}
  assert len(backgrounds) > 100 and all(min(b) >= 200 for b in backgrounds)  # plain, light, varied
  positions = np.array([(o["x"], o["y"]) for s in scenes for o in s["objects"]])
  assert positions.std(0).min() > 0.15  # objects are spread over the canvas


def _colour_masks(img):
  """{colour name: bool mask of pixels within a small distance of that palette colour}."""
  return {name: np.abs(img.astype(int) - np.array(rgb)).max(-1) <= 12 for name, rgb in shapes.COLOURS.items()}


@pytest.mark.parametrize("index", range(40))
def test_caption_matches_the_drawn_pixels(index):
  img, caption = shapes.render(index, RES, seed=0)
  sc = shapes.scene(index, 0)
  caption = shapes.canonical_caption(caption)  # the phrasing aside (tested below)
  named = re.findall(r"\ba (\w+) (\w+)", caption)
  assert sorted(named) == sorted((o["colour"], o["shape"]) for o in sc["objects"])
  masks = _colour_masks(img)
  drawn = {c for c, m in masks.items() if m.sum() >= 4}
  assert drawn == {c for c, _ in named}, (caption, drawn)
  for o in sc["objects"]:  # every object's centre has its colour
    y, x = int(o["y"] * RES), int(o["x"] * RES)
    assert masks[o["colour"]][y, x], (caption, o)
  if len(named) == 2:  # the stated relation holds for the pixel centroids
    (ca, _), (cb, _) = named
    ya, xa = np.argwhere(masks[ca]).mean(0)
    yb, xb = np.argwhere(masks[cb]).mean(0)
    rel = re.search(r"(above|below|to the left of|to the right of)", caption).group(1)
    assert {"above": ya < yb, "below": ya > yb, "to the left of": xa < xb, "to the right of": xa > xb}[rel]
  if len(named) == 3:  # listed left to right
    xs = [np.argwhere(masks[c]).mean(0)[1] for c, _ in named]
    assert xs == sorted(xs), caption
    assert re.fullmatch(r"a \w+ \w+, a \w+ \w+ and a \w+ \w+", caption)


def test_captions_are_phrased_several_ways_and_read_back():
  scenes = [shapes.scene(i, 2) for i in range(3000)]
  caps = [sc["caption"] for sc in scenes]
  for sc, cap in zip(scenes, caps):  # every phrasing names the same scene
    assert shapes.canonical_caption(cap) == shapes.caption_of(sc["objects"]), cap
  for prefix, share in shapes.PREFIXES.items():
    n = sum(
        c.startswith(prefix) and not any(c.startswith(p) for p in shapes.PREFIXES if len(p) > len(prefix)) for c in caps
    )
    assert abs(n / len(caps) - share) < 0.03, (prefix, n)
  sideways = [c for c in caps if " left of " in c or " right of " in c]
  short = [c for c in sideways if " to the " not in c]
  assert abs(len(short) / len(sideways) - shapes.VARIANT_SHARE) < 0.06
  vowels = [c for c in caps if "orange" in c]
  assert abs(sum(" an orange" in f" {c}" for c in vowels) / len(vowels) - shapes.VARIANT_SHARE) < 0.06
  assert len({shapes.canonical_caption(c) for c in caps}) < len(set(caps))  # phrasing adds variety
  # The phrasing has its own random stream: the scenes (and so every image) are those of the plain captions.
  assert shapes.caption_of(shapes.scene(0, 0)["objects"]) == "a orange diamond, a green circle and a purple star"
  assert shapes.caption_of(shapes.scene(7, 0)["objects"]) == "a purple triangle above a yellow circle"


def test_geneval_phrasing_and_its_inverse():
  cap = "a orange circle to the left of a red square"
  assert shapes.geneval_phrase(cap) == "a photo of an orange circle left of a red square"
  assert shapes.canonical_caption(shapes.geneval_phrase(cap)) == cap
  assert shapes.canonical_caption(cap) == cap  # the captions' own grammar is left as it is
  assert shapes.canonical_caption("an image of a red star right of an orange hexagon") == (
      "a red star to the right of a orange hexagon"
  )
  three = "a red circle, a orange star and a blue square"
  assert (
      shapes.phrase(three, "a picture of ", articles=True)
      == "a picture of a red circle, an orange star and a blue square"
  )


def test_write_folder_is_atomic_and_idempotent(tmp_path):
  dst = tmp_path / "shapes"
  shapes.write_folder(dst, 12, 32, seed=5)
  pngs = sorted(p.name for p in dst.glob("*.png"))
  assert len(pngs) == 12
  lines = [json.loads(x) for x in (dst / "captions.jsonl").read_text().splitlines()]
  assert [x["file"] for x in lines] == pngs
  assert lines[3]["caption"] == shapes.render(3, 32, 5)[1]
  from PIL import Image

  np.testing.assert_array_equal(np.asarray(Image.open(dst / pngs[3])), shapes.render(3, 32, 5)[0])
  stamp = (dst / pngs[0]).stat().st_mtime_ns
  shapes.write_folder(dst, 12, 32, seed=5)  # same parameters: nothing rewritten
  assert (dst / pngs[0]).stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no temporary folder left behind
  with pytest.raises(ValueError, match="does not hold the shapes dataset"):
    shapes.write_folder(dst, 13, 32, seed=5)


def test_scenes_keep_their_geometry_rules():
  """Every scene of the world: objects apart (no overlap), a two-object relation unambiguous (the dominant axis at
  least 1.5× the other), three objects at visibly different x (the left-to-right order their caption lists)."""
  for i in range(600):
    objs = shapes.scene(i, 0)["objects"]
    for a in range(len(objs)):
      for b in range(a):
        oa, ob = objs[a], objs[b]
        assert np.hypot(oa["x"] - ob["x"], oa["y"] - ob["y"]) > oa["r"] + ob["r"], (i, objs)
    if len(objs) == 2:
      dx, dy = abs(objs[1]["x"] - objs[0]["x"]), abs(objs[1]["y"] - objs[0]["y"])
      assert max(dx, dy) >= 1.5 * min(dx, dy), (i, objs)
    if len(objs) == 3:
      xs = sorted(o["x"] for o in objs)
      assert min(b - a for a, b in zip(xs, xs[1:])) > 0.06, (i, objs)
