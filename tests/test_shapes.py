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
