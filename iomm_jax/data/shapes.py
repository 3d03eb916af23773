"""Deterministic procedural data: coloured shapes on plain light backgrounds, with captions.

Every image is a pure function of ``(index, seed)``: 1–3 objects (6 shapes × 7 colours, distinct colours within an
image) at varied positions and sizes, drawn with PIL at 2–4× and box-filtered down (antialiasing). Captions name the
objects; two objects also get their spatial relation ("a red circle above a blue square"), three are listed left to
right ("a red circle, a blue square and a green triangle"). Relations are made unambiguous by construction (the
dominant axis of the displacement is at least 1.5× the other). Half of the captions are phrased otherwise, as
alt-text and benchmark prompts are ("a photo of an orange circle left of a blue square"; :func:`phrased_caption`), so
a model trained on the world follows its descriptions however they are phrased.

The same data can be rendered on the fly (``sources.ShapesSource``), written as a folder of PNGs
(:func:`write_folder`) or as ArrayRecord shards through ``prepare`` (``shapes_shards.write_arrayrecord``).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from iomm_jax.data import corpus_files

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLOURS = {  # saturated object colours, all far from the light backgrounds
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 10),
    "purple": (135, 50, 185),
    "orange": (245, 135, 25),
    "black": (25, 25, 25),
}
_VERSION = 2  # bump when the rendering or the captions change, so write_folder does not reuse stale folders


def scene(index: int, seed: int) -> dict:
  """The scene description of image ``index``: background, objects (normalised geometry) and caption."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0x5AA9E5])
  bg = tuple(int(c) for c in rng.uniform(205, 250, size=3))
  n = int(rng.integers(1, 4))
  colours = [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]
  shapes = [str(s) for s in rng.choice(SHAPES, size=n)]
  lo, hi = (0.14, 0.32) if n == 1 else (0.08, 0.18)
  for _ in range(1000):  # rejection sampling: no overlap, unambiguous relation
    radii = rng.uniform(lo, hi, size=n)
    xy = [rng.uniform(r + 0.02, 1 - r - 0.02, size=2) for r in radii]
    ok = all(np.hypot(*(xy[i] - xy[j])) > radii[i] + radii[j] + 0.03 for i in range(n) for j in range(i))
    if ok and n == 2:
      dx, dy = np.abs(xy[1] - xy[0])
      ok = max(dx, dy) >= 1.5 * min(dx, dy)
    if ok and n == 3:  # left-to-right order must be visible
      xs = sorted(p[0] for p in xy)
      ok = min(b - a for a, b in zip(xs, xs[1:])) > 0.06
    if ok:
      break
    lo, hi = lo * 0.995, hi * 0.995  # shrink slowly if the draw keeps failing
  objects = [
      dict(shape=s, colour=c, x=float(p[0]), y=float(p[1]), r=float(r))
      for s, c, p, r in zip(shapes, colours, xy, radii)
  ]
  return dict(background=bg, objects=objects, caption=phrased_caption(caption_of(objects), index, seed))


RELATIONS = ("above", "below", "to the left of", "to the right of")  # where a two-object caption's first object lies


def relation_of(a: dict, b: dict) -> str:
  """Where object ``a`` lies relative to ``b``, in caption words; the dominant axis of the displacement decides
  (image y grows downwards: a is above b when b is lower)."""
  dx, dy = b["x"] - a["x"], b["y"] - a["y"]
  if abs(dy) >= abs(dx):
    return "above" if dy > 0 else "below"
  return "to the left of" if dx > 0 else "to the right of"


def caption_of(objects: list[dict]) -> str:
  """Caption for a list of objects as produced by :func:`scene`."""
  names = [f"a {o['colour']} {o['shape']}" for o in objects]
  if len(objects) == 1:
    return names[0]
  if len(objects) == 2:
    return f"{names[0]} {relation_of(*objects)} {names[1]}"
  order = sorted(range(len(objects)), key=lambda i: objects[i]["x"])
  ordered = [names[i] for i in order]
  return ", ".join(ordered[:-1]) + " and " + ordered[-1]


# Captions are phrased several ways, as alt-text is (and as other benchmarks' prompts are): the plain grammar of
# caption_of, or behind a prefix such as GenEval's "a photo of", with "an" before a vowel ("an orange circle"), and
# left/right relations in GenEval's shorter words. The phrasing of image `index` is drawn from its own stream (the
# scene's geometry does not change with it).
PREFIXES = {"": 0.5, "a photo of ": 0.3, "an image of ": 0.1, "a picture of ": 0.1}  # prefix → share of captions
SHORT_RELATIONS = {"to the left of": "left of", "to the right of": "right of"}  # caption words → GenEval's
VARIANT_SHARE = 0.5  # of the captions, each independently: short relation words; "an" before a vowel
GENEVAL_PREFIX = "a photo of "
_AN = re.compile(r"\ba (?=[aeiou])")


def phrase(caption: str, prefix: str = "", short_relations: bool = False, articles: bool = False) -> str:
  """`caption` (caption_of's grammar) behind `prefix`, with GenEval's relation words when `short_relations`, and
  "an" before a vowel when `articles`."""
  if short_relations:
    for long, short in SHORT_RELATIONS.items():
      caption = caption.replace(f" {long} ", f" {short} ")
  if articles:
    caption = _AN.sub("an ", caption)
  return prefix + caption


def phrased_caption(caption: str, index: int, seed: int) -> str:
  """The phrasing of image `index`'s caption: a prefix drawn by PREFIXES' shares, the short relation words and the
  articles each by VARIANT_SHARE (deterministic in (index, seed))."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0xCA9710])
  prefix = str(rng.choice(list(PREFIXES), p=list(PREFIXES.values())))
  short, articles = (rng.random(2) < VARIANT_SHARE).tolist()
  return phrase(caption, prefix, short_relations=short, articles=articles)


def geneval_phrase(caption: str) -> str:
  """A caption as GenEval phrases its prompts: "a photo of an orange circle left of a red square"."""
  return phrase(caption, GENEVAL_PREFIX, short_relations=True, articles=True)


def canonical_caption(text: str) -> str:
  """Any phrasing of a caption back to caption_of's grammar (no prefix, "a" throughout, the long relation words)."""
  for prefix in sorted(PREFIXES, key=len, reverse=True):
    if prefix and text.startswith(prefix):
      text = text[len(prefix) :]
      break
  text = re.sub(r"\ban ", "a ", text)
  for long, short in SHORT_RELATIONS.items():
    text = re.sub(rf"(?<!{long[: -len(short)]}){short} ", f"{long} ", text)  # not when already the long words
  return text


def _polygon(cx: float, cy: float, r: float, k: int, start_deg: float, inner: float | None = None):
  pts = []
  for i in range(k * (2 if inner else 1)):
    rad = r if (inner is None or i % 2 == 0) else r * inner
    a = math.radians(start_deg + i * 360.0 / (k * (2 if inner else 1)))
    pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
  return pts


def _draw(draw: ImageDraw.ImageDraw, o: dict, size: int) -> None:
  cx, cy, r, fill = o["x"] * size, o["y"] * size, o["r"] * size, COLOURS[o["colour"]]
  s = o["shape"]
  if s == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif s == "square":
    h = r * 0.85  # similar area to the circle
    draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
  elif s == "triangle":
    draw.polygon(_polygon(cx, cy + 0.15 * r, r * 1.1, 3, -90), fill=fill)
  elif s == "diamond":
    draw.polygon(_polygon(cx, cy, r, 4, -90), fill=fill)
  elif s == "star":
    draw.polygon(_polygon(cx, cy, r * 1.1, 5, -90, inner=0.45), fill=fill)
  elif s == "hexagon":
    draw.polygon(_polygon(cx, cy, r, 6, 0), fill=fill)
  else:  # pragma: no cover - SHAPES is closed
    raise ValueError(f"unknown shape {s!r}")


def render_objects(objects: list[dict], resolution: int, background: tuple[int, int, int]) -> np.ndarray:
  """Renders an explicit object list (``scene``'s normalised geometry) on a plain background as uint8 (R, R, 3)."""
  if resolution < 8:
    raise ValueError(f"shapes.render: resolution={resolution} is too small; use 8 or more")
  ss = 4 if resolution <= 256 else 2  # supersampling factor for antialiased edges
  big = resolution * ss
  img = Image.new("RGB", (big, big), tuple(int(c) for c in background))
  draw = ImageDraw.Draw(img)
  for o in objects:
    _draw(draw, o, big)
  img = img.resize((resolution, resolution), Image.Resampling.BOX)
  return np.asarray(img, dtype=np.uint8)


def render(index: int, resolution: int, seed: int = 0) -> tuple[np.ndarray, str]:
  """Renders image ``index`` of the dataset ``seed`` as uint8 (resolution, resolution, 3) plus its caption."""
  if resolution < 8:
    raise ValueError(f"shapes.render: resolution={resolution} is too small; use 8 or more")
  sc = scene(index, seed)
  return render_objects(sc["objects"], resolution, sc["background"]), sc["caption"]


def single_object_set(num: int, resolution: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The first `num` single-object scenes of the dataset `seed`: uint8 images (num, R, R, 3) and (shape, colour)
  indices into SHAPES and COLOURS, int32 (num, 2)."""
  colours = list(COLOURS)
  images, labels, index = [], [], 0
  while len(images) < num:
    sc = scene(index, seed)
    index += 1
    if len(sc["objects"]) != 1:
      continue
    o = sc["objects"][0]
    images.append(render_objects([o], resolution, sc["background"]))
    labels.append((SHAPES.index(o["shape"]), colours.index(o["colour"])))
  return np.stack(images), np.asarray(labels, np.int32)


def render_png(index: int, resolution: int, seed: int = 0) -> tuple[bytes, str]:
  """:func:`render` encoded as PNG bytes (the loader that ``prepare`` uses for shapes)."""
  arr, caption = render(index, resolution, seed)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
  return buf.getvalue(), caption


def dataset_params(num: int, resolution: int, seed: int) -> dict:
  return {
      "generator": "iomm_jax.data.shapes",
      "version": _VERSION,
      "num": int(num),
      "resolution": int(resolution),
      "seed": int(seed),
  }


META_FILE = "shapes.json"


def write_folder(dst: str | os.PathLike, num: int, resolution: int, seed: int = 0) -> Path:
  """Writes ``num`` PNGs plus ``captions.jsonl`` into ``dst``, atomically; no-op if already written identically.

  The folder is built under a temporary name next to ``dst`` and renamed into place when complete, so a killed
  run never leaves a partial dataset at ``dst``. An existing ``dst`` with other parameters is an error (we never
  delete user data).
  """
  dst = Path(dst)
  params = dataset_params(num, resolution, seed)
  if dst.exists():
    _check_existing(dst, params)
    return dst
  dst.parent.mkdir(parents=True, exist_ok=True)
  # not output_folder.replacing: that replaces a `dst` another process finished first; this keeps it (and checks it)
  tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    with open(tmp / corpus_files.CAPTIONS_FILE, "w") as f:
      for i in range(num):
        png, caption = render_png(i, resolution, seed)
        name = f"{i:06d}.png"
        (tmp / name).write_bytes(png)
        f.write(corpus_files.caption_line(name, caption))
    (tmp / META_FILE).write_text(json.dumps(params, sort_keys=True))
    try:
      os.rename(tmp, dst)
    except OSError:  # another process finished first (shared filesystem, several hosts)
      if not dst.exists():
        raise
      _check_existing(dst, params)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return dst


def _check_existing(dst: Path, params: dict) -> None:
  meta = dst / META_FILE
  found = json.loads(meta.read_text()) if meta.exists() else None
  if found != params:
    raise ValueError(
        f"{dst} exists but does not hold the shapes dataset {params} (found {found}); delete it or "
        "point data.path somewhere else"
    )
