"""mini-GenEval's definition for the procedural shapes world: the prompt set, the scoring rules and the chance level.

A fixed set of 72 prompts (GenEval metadata: `tag`, `include` [{"class", "count", "color", "position"}], `prompt`),
covering the 6 shapes and 7 colours evenly, in the GenEval categories this world can express. Every sample is scored
by `iomm_jax.shapes_detector`, GenEval style (an included object counts as present when a detection has its class,
and its colour where the metadata gives one):

  single_object_shape   "a red circle": a circle is present (GenEval's single_object)
  single_object_colour  "a red circle": a red object is present (GenEval's colors)
  two_object            "a red circle above a blue square": a circle and a square are present
  colour_attr           same form: a red circle and a blue square are present
  position              same form: a circle and a square, the circle above the square (the captions' rule: the
                        dominant axis of the displacement decides)
  three_object          "a red circle, a blue square and a green triangle": all three, in that order left to right
  counting              every image: exactly as many objects as the prompt names

An image with more than 3 detected objects (the world never draws more) fails every category. Each category's score
is the fraction of its images that are correct; `overall` is the mean over the categories, as GenEval averages
its tasks.

Metadata written for GenEval itself scores too, when its classes are this world's shapes and its colours this world's
colours: a tag other than the five above ("colors", "color_attr", "counting" of GenEval's six tasks, or any other) is
its own category, scored by GenEval's rule — each `include` entry's class present `count` times (with its `color`,
placed by its `position` relative to an earlier entry), and no `exclude` entry's class present `count` times or more —
and a GenEval `single_object` entry without a colour scores the shape alone. Where a folder holds "counting"-tagged
prompts, they alone make the `counting` category (GenEval's counting task) instead of the every-image check.

`chance` is the score of images drawn from the training distribution regardless of the prompt (estimated on 400
dataset scenes with perfect detection); `--uncond` samples with the empty prompt (metadata unchanged) to measure it on
the model.
"""

from __future__ import annotations

import re

import numpy as np

from iomm_jax import shapes_detector
from iomm_jax.data import shapes

CATEGORIES = (
    "single_object_shape",
    "single_object_colour",
    "two_object",
    "colour_attr",
    "position",
    "three_object",
    "counting",
)
MAX_OBJECTS = 3  # the world never draws more: an image with more detections is not one of its scenes
TAGS = {
    "single_object": ("single_object_shape", "single_object_colour"),
    "two_object": ("two_object",),
    "colour_attr": ("colour_attr",),
    "position": ("position",),
    "three_object": ("three_object",),
}
PROMPTS_PER_TAG = {"single_object": 14, "two_object": 14, "colour_attr": 14, "position": 16, "three_object": 14}
RELATIONS = {r: shapes.SHORT_RELATIONS.get(r, r) for r in shapes.RELATIONS}  # caption words → GenEval's
_SEED = 0x6E7A1  # the prompt set is part of the benchmark: never change it silently
_CHANCE_SCENES = 400

_OBJ = rf"a ({'|'.join(shapes.COLOURS)}) ({'|'.join(shapes.SHAPES)})"
_REL = "|".join(RELATIONS)
_ONE = re.compile(rf"^{_OBJ}$")
_TWO = re.compile(rf"^{_OBJ} ({_REL}) {_OBJ}$")
_THREE = re.compile(rf"^{_OBJ}, {_OBJ} and {_OBJ}$")


# ---------------------------------------------------------------------------------------------------- prompt set


def _least_used(rng, items, used: dict, k: int, jitter: float = 0.0) -> list:
  """k distinct items, the least used so far first (seeded tie-break), so every item appears about equally often.

  `jitter` > 0 lets slightly more used items win sometimes (to draw again when a prompt came out twice).
  """
  pick = sorted(items, key=lambda it: used[it] + rng.random() * (0.999 + jitter))[:k]
  return [pick[i] for i in rng.permutation(k)]


PHRASINGS = ("captions", "geneval")  # prompt_set's phrasings: the captions' own grammar, or GenEval's


def prompt_set(phrasing: str = "captions") -> list[dict]:
  """The fixed prompt set: GenEval metadata objects, in category order (deterministic). `phrasing='geneval'`
  words the same prompts as GenEval does ("a photo of an orange circle left of a red square"; the metadata is
  unchanged), to measure how far prompt following depends on the phrasing."""
  if phrasing not in PHRASINGS:
    raise ValueError(f"phrasing={phrasing!r}: use one of {', '.join(PHRASINGS)}")
  rng = np.random.default_rng(_SEED)
  out, seen = [], set()
  for tag, count in PROMPTS_PER_TAG.items():
    k = {"single_object": 1, "three_object": 3}.get(tag, 2)
    used_s, used_c = dict.fromkeys(shapes.SHAPES, 0), dict.fromkeys(shapes.COLOURS, 0)
    used_r = dict.fromkeys(RELATIONS, 0)
    for _ in range(count):
      for attempt in range(100):  # prompts are unique over the whole set
        jitter = 0.5 * attempt
        objs = list(
            zip(
                _least_used(rng, list(shapes.COLOURS), used_c, k, jitter),
                _least_used(rng, shapes.SHAPES, used_s, k, jitter),
            )
        )
        rel = _least_used(rng, list(RELATIONS), used_r, 1)[0] if k == 2 else None
        names = [f"a {c} {s}" for c, s in objs]
        prompt = {1: names[0], 2: f"{names[0]} {rel} {names[-1]}", 3: ", ".join(names[:-1]) + f" and {names[-1]}"}[k]
        if prompt not in seen:
          break
      seen.add(prompt)
      for c, s in objs:
        used_c[c] += 1
        used_s[s] += 1
      if rel:
        used_r[rel] += 1
      if k == 1:
        include = [{"class": objs[0][1], "count": 1, "color": objs[0][0]}]
      elif k == 3:
        include = [{"class": s, "count": 1, "color": c} for c, s in objs]
      else:
        (ca, sa), (cb, sb) = objs
        if tag == "two_object":
          include = [{"class": sa, "count": 1}, {"class": sb, "count": 1}]
        elif tag == "colour_attr":
          include = [{"class": sa, "count": 1, "color": ca}, {"class": sb, "count": 1, "color": cb}]
        else:  # GenEval's position form: the reference object first, the other placed relative to group 0
          include = [{"class": sb, "count": 1}, {"class": sa, "count": 1, "position": [RELATIONS[rel], 0]}]
      meta = {
          "tag": tag,
          "include": include,
          "prompt": shapes.geneval_phrase(prompt) if phrasing == "geneval" else prompt,
      }
      if tag == "three_object":
        meta["left_to_right"] = True  # include lists the objects in their left-to-right order
      out.append(meta)
  return out


def parse_prompt(prompt: str) -> tuple[list[tuple[str, str]], str | None]:
  """([(colour, shape), ...] in prompt order, relation word or None) of a caption of the shapes world, in any of
  its phrasings (`shapes.canonical_caption`)."""
  prompt = shapes.canonical_caption(prompt)
  if m := _ONE.match(prompt):
    return [m.groups()], None
  if m := _TWO.match(prompt):
    g = m.groups()
    return [(g[0], g[1]), (g[3], g[4])], g[2]
  if m := _THREE.match(prompt):
    g = m.groups()
    return [(g[0], g[1]), (g[2], g[3]), (g[4], g[5])], None
  raise ValueError(f"{prompt!r} is not a caption of the shapes world (e.g. 'a red circle above a blue square')")


# ---------------------------------------------------------------------------------------------------- scoring


def relation(a: dict, b: dict) -> str:
  """GenEval's name of where `a` lies relative to `b`, by the captions' rule (dominant axis; y grows downwards)."""
  return RELATIONS[shapes.relation_of(a, b)]


def _matches(req: dict, objects: list[dict]) -> list[dict]:
  return [o for o in objects if o["shape"] == req["class"] and ("color" not in req or o["colour"] == req["color"])]


def check_metadata(meta: dict) -> None:
  """Raises ValueError naming the field when `meta` is not GenEval metadata over this world's shapes and colours."""
  tag = meta.get("tag")
  if not isinstance(tag, str) or not tag:
    raise ValueError(f"no 'tag' (a GenEval task name such as {', '.join(sorted(TAGS))}, colors, counting)")
  if not isinstance(meta.get("include"), list) or not meta["include"]:
    raise ValueError(f"tag {tag!r} has no 'include' list of the objects the prompt asks for")
  if not isinstance(meta.get("exclude", []), list):
    raise ValueError("'exclude' is not a list")
  for field in ("include", "exclude"):
    for i, req in enumerate(meta.get(field, [])):
      where = f"{field}[{i}]"
      if not isinstance(req, dict) or req.get("class") not in shapes.SHAPES:
        got = req.get("class") if isinstance(req, dict) else req
        raise ValueError(f"{where} class {got!r} is not a shape of this world ({', '.join(shapes.SHAPES)})")
      if "color" in req and req["color"] not in shapes.COLOURS:
        raise ValueError(f"{where} color {req['color']!r} is not a colour of this world ({', '.join(shapes.COLOURS)})")
      count = req.get("count", 1)
      if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where} count {count!r} is not a positive integer")
      pos = req.get("position")
      if pos is not None and not (
          isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS.values() and pos[1] in range(i)
      ):
        raise ValueError(
            f"{where} position {pos!r} is not [relation, index of an earlier include entry] with relation one of "
            f"{', '.join(RELATIONS.values())}"
        )
  asked = sum(r.get("count", 1) for r in meta["include"])
  if asked > MAX_OBJECTS:
    raise ValueError(f"the prompt asks for {asked} objects; this world draws at most {MAX_OBJECTS}")


def score(metadata: dict, objects: list[dict]) -> dict[str, bool]:
  """{category: correct} for one image's objects (dicts with colour, shape, x, y; the largest first).

  Every image of mini-GenEval's own tags is also scored for `counting`: exactly as many objects as the prompt names.
  Any other tag is one category, by GenEval's rule. An image with more than MAX_OBJECTS objects fails everything
  (else scattered coloured specks would pass the presence checks).
  """
  tag = metadata.get("tag")
  if tag in TAGS:
    asked = sum(r.get("count", 1) for r in metadata["include"])
    result = {**_score_attributes(tag, metadata, objects), "counting": len(objects) == asked}
  else:
    result = {tag: _geneval_rule(metadata, objects)}
  return dict.fromkeys(result, False) if len(objects) > MAX_OBJECTS else result


def _score_attributes(tag: str, metadata: dict, objects: list[dict]) -> dict[str, bool]:
  include = metadata["include"]
  if tag == "single_object":
    req = include[0]
    shape = {"single_object_shape": any(o["shape"] == req["class"] for o in objects)}
    if "color" not in req:  # GenEval's own single_object: the class alone
      return shape
    return {**shape, "single_object_colour": any(o["colour"] == req["color"] for o in objects)}
  return {TAGS[tag][0]: _geneval_rule(metadata, objects)}


def _geneval_rule(metadata: dict, objects: list[dict]) -> bool:
  """GenEval's check: every `include` entry present `count` times (colour, position relative to an earlier entry's
  objects), no `exclude` entry's class `count` times or more; mini-GenEval's three-object prompts also ask for the
  listed left-to-right order."""
  groups = []
  for req in metadata["include"]:
    found = _matches(req, objects)[: req.get("count", 1)]
    if len(found) < req.get("count", 1):
      return False
    if "position" in req:
      rel, target = req["position"]
      if any(relation(o, t) != rel for o in found for t in groups[target]):
        return False
    groups.append(found)
  if any(len(_matches(req, objects)) >= req.get("count", 1) for req in metadata.get("exclude", [])):
    return False
  if metadata.get("left_to_right"):
    xs = [g[0]["x"] for g in groups]
    return xs == sorted(xs) and len(set(xs)) == len(xs)
  return True


def _names_one_colour(meta: dict) -> bool:
  return meta["tag"] == "single_object" and "color" in meta["include"][0]


def _summarise(results: list[tuple[dict, list[dict[str, bool]]]]) -> tuple[dict, dict]:
  """(score per category, {category: {"prompts", "images"}}) from (metadata, per-image results) pairs."""
  hits = {c: [] for c in CATEGORIES}
  prompts = dict.fromkeys(CATEGORIES, 0)
  geneval_counting = any(meta["tag"] == "counting" for meta, _ in results)  # GenEval's task replaces the check
  for meta, per_image in results:
    for c in per_image[0] if per_image else ():
      if c == "counting" and geneval_counting and meta["tag"] != "counting":
        continue
      hits.setdefault(c, []).extend(r[c] for r in per_image)
      prompts[c] = prompts.get(c, 0) + 1
  scores = {c: float(np.mean(h)) for c, h in hits.items() if h}
  return scores, {c: {"prompts": prompts[c], "images": len(h)} for c, h in hits.items() if h}


def _overall(scores: dict) -> float:
  return float(np.mean(list(scores.values())))


def chance(metadata: list[dict], num_scenes: int = _CHANCE_SCENES, seed: int = 1234) -> dict:
  """Per-category score of training-distribution images that ignore the prompt (perfect detection)."""
  scenes = [shapes.scene(i, seed)["objects"] for i in range(num_scenes)]
  scores, _ = _summarise([(m, [score(m, objs) for objs in scenes]) for m in metadata])
  singles = [m["include"][0]["color"] for m in metadata if _names_one_colour(m)]
  if not singles:  # no prompt names one colour: no dominant-colour diagnostic (and no mean of nothing)
    return {**scores, "overall": _overall(scores)}
  largest = [max(objs, key=lambda o: o["r"])["colour"] for objs in scenes]
  dominant = float(np.mean([c == big for c in singles for big in largest]))
  return {**scores, "overall": _overall(scores), "single_object_dominant_colour": dominant}


# ---------------------------------------------------------------------------------------------------- ground truth


def scene_for(prompt: str, rng: np.random.Generator) -> dict:
  """A random scene (background, objects) whose caption is `prompt`: sizes and spacing as in `shapes.scene`."""
  named, rel = parse_prompt(prompt)
  n = len(named)
  lo, hi = (0.14, 0.32) if n == 1 else (0.08, 0.18)
  bg = tuple(int(c) for c in rng.uniform(205, 250, size=3))
  for _ in range(10000):
    radii = rng.uniform(lo, hi, size=n)
    xy = [rng.uniform(r + 0.02, 1 - r - 0.02, size=2) for r in radii]
    if n == 3:  # listed left to right: give the listed objects the positions in x order
      order = np.argsort([p[0] for p in xy])
      radii, xy = radii[order], [xy[i] for i in order]
    ok = all(np.hypot(*(xy[i] - xy[j])) > radii[i] + radii[j] + 0.03 for i in range(n) for j in range(i))
    if ok and n == 2:
      dx, dy = np.abs(xy[1] - xy[0])
      ok = max(dx, dy) >= 1.5 * min(dx, dy)
    if ok and n == 3:
      ok = min(b[0] - a[0] for a, b in zip(xy, xy[1:])) > 0.06
    objects = [
        dict(shape=s, colour=c, x=float(p[0]), y=float(p[1]), r=float(r)) for (c, s), p, r in zip(named, xy, radii)
    ]
    if ok and shapes.caption_of(objects) == shapes.canonical_caption(prompt):
      return dict(background=bg, objects=objects)
  raise RuntimeError(f"could not place {prompt!r}")  # pragma: no cover - placement succeeds within ~20 draws


def render_prompt(prompt: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
  sc = scene_for(prompt, rng)
  return shapes.render_objects(sc["objects"], resolution, sc["background"])


def score_images(metadata: list[dict], images: list[np.ndarray]) -> dict:
  """Scores per-prompt image stacks (uint8 (n, H, W, 3)); returns scores, counts and per-prompt results."""
  results, per_prompt, dominant = [], [], []
  for i, (meta, imgs) in enumerate(zip(metadata, images)):
    dets = [[d.as_dict() for d in shapes_detector.detect(img)] for img in imgs]
    if _names_one_colour(meta):  # diagnostic: the prompt's colour is the image's main colour
      dominant += [shapes_detector.dominant_colour(img) == meta["include"][0]["color"] for img in imgs]
    res = [score(meta, d) for d in dets]
    results.append((meta, res))
    per_prompt.append(
        {
            "index": i,
            "tag": meta["tag"],
            "prompt": meta["prompt"],
            "correct": [all(r.values()) for r in res],
            "detected": [[f"{o['colour']} {o['shape']}" for o in d] for d in dets],
        }
    )
  scores, counts = _summarise(results)
  # Not a GenEval category and not in `overall`: shows colour following while shapes are still too rough to detect.
  diagnostics = {"single_object_dominant_colour": float(np.mean(dominant))} if dominant else {}
  return {
      "scores": scores,
      "overall": _overall(scores),
      "diagnostics": diagnostics,
      "counts": counts,
      "per_prompt": per_prompt,
  }


def validate(
    resolution: int = 32, num: int = 4, seed: int = 0, metadata: list[dict] | None = None, phrasing: str = "captions"
) -> dict:
  """The scorer on true renders of its prompts (should be ~1) and on dataset renders that ignore them (~chance).

  `ground_truth`: `num` random scenes satisfying each prompt (`scene_for`); `unrelated`: `num` dataset images
  (`shapes.render`, a seed never trained on) per prompt, i.e. a generator that ignores the prompt; `chance`: the
  exact expectation of the latter with a perfect detector.
  """
  metadata = metadata or prompt_set(phrasing)
  rng = np.random.default_rng([seed, resolution])
  images = [np.stack([render_prompt(m["prompt"], resolution, rng) for _ in range(num)]) for m in metadata]
  truth = score_images(metadata, images)
  other = [
      np.stack([shapes.render(i * num + j, resolution, seed=9000 + seed)[0] for j in range(num)])
      for i in range(len(metadata))
  ]
  unrelated = score_images(metadata, other)
  return {
      "resolution": resolution,
      "num_per_prompt": num,
      "prompts": len(metadata),
      "ground_truth": {**truth["scores"], "overall": truth["overall"]},
      "unrelated": {**unrelated["scores"], "overall": unrelated["overall"]},
      "chance": chance(metadata),
  }
