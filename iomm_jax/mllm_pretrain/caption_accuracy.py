"""Held-out caption accuracy of the tiny MLLM: exact caption, and per attribute (colour, shape, relation).

Captions follow the shapes world's grammar (data/shapes.caption_of): "a red circle", "a red circle above a blue
square", "a red circle, a blue square and a green triangle" (three objects are listed left to right), in any of its
phrasings ("a photo of an orange circle left of …" is read as "a orange circle to the left of …"). A two-object
scene has two correct captions ("A above B" = "B below A"), so captions are compared in a canonical form, and
attributes are matched as multisets: an object's colour (shape) counts as named when the prediction names it.
The relation of a two-object scene counts as right when the predicted colours stand in the true relation.
"""

from __future__ import annotations

import re
from collections import Counter

from iomm_jax.data import shapes

RELATIONS = shapes.RELATIONS
_INVERSE = {"below": "above", "to the right of": "to the left of"}
_OBJECT = re.compile(r"\ba (\w+) (\w+)")


def normalise(caption: str) -> str:
  """Lower case, one space between words, commas as words (how the word-level tokenizer decodes them)."""
  return " ".join(caption.lower().replace(",", " , ").split())


def parse(caption: str) -> dict:
  """{'objects': [(colour, shape), ...], 'relation': str | None} of a caption in any of the world's phrasings
  (unknown words are kept as they are)."""
  text = shapes.canonical_caption(normalise(caption))
  objects = [(c, s) for c, s in _OBJECT.findall(text)]
  relation = next((r for r in sorted(RELATIONS, key=len, reverse=True) if f" {r} " in f" {text} "), None)
  return {"objects": objects, "relation": relation}


def canonical(parsed: dict) -> tuple:
  """One form per scene description: 'B below A' becomes 'A above B', 'B right of A' becomes 'A left of B'."""
  objs, rel = list(parsed["objects"]), parsed["relation"]
  if len(objs) == 2 and rel in _INVERSE:
    objs, rel = objs[::-1], _INVERSE[rel]
  return tuple(objs), rel


def chance_levels() -> dict:
  """Accuracy of guessing uniformly: colour 1/7, shape 1/6, relation 1/4 (exact is far lower)."""
  return {"colour": 1 / len(shapes.COLOURS), "shape": 1 / len(shapes.SHAPES), "relation": 1 / len(RELATIONS)}


def _overlap(a: list, b: list) -> int:
  return sum((Counter(a) & Counter(b)).values())


def score(predicted: list[str], truth: list[str]) -> dict:
  """Exact-caption accuracy (canonical form) and per-attribute accuracies over paired predicted/true captions."""
  exact = colour = shape = n_obj = rel = n_rel = 0
  for p, t in zip(predicted, truth):
    pp, tt = parse(p), parse(t)
    exact += canonical(pp) == canonical(tt)
    n_obj += len(tt["objects"])
    colour += _overlap([o[0] for o in pp["objects"]], [o[0] for o in tt["objects"]])
    shape += _overlap([o[1] for o in pp["objects"]], [o[1] for o in tt["objects"]])
    if tt["relation"] is not None:
      n_rel += 1
      (pa, pr), (ta, tr) = canonical(pp), canonical(tt)
      rel += len(pa) == 2 and pr == tr and [o[0] for o in pa] == [o[0] for o in ta]
  n = max(len(truth), 1)
  return {
      "exact": exact / n,
      "colour": colour / max(n_obj, 1),
      "shape": shape / max(n_obj, 1),
      "relation": rel / max(n_rel, 1),
      "num_captions": len(truth),
      "num_objects": n_obj,
      "num_relations": n_rel,
  }


def score_by_objects(predicted: list[str], truth: list[str]) -> dict[str, dict]:
  """:func:`score` per number of objects in the true caption ({'1': {...}, '2': {...}, ...}).

  The split tells apart what the pooled figures mix: on two- and three-object scenes a guessed shape is often right
  by luck (any of the scene's shapes counts), so shape on single objects is the clean measure of shape recognition.
  """
  groups: dict[int, tuple[list[str], list[str]]] = {}
  for p, t in zip(predicted, truth):
    ps, ts = groups.setdefault(len(parse(t)["objects"]), ([], []))
    ps.append(p)
    ts.append(t)
  return {str(n): score(*groups[n]) for n in sorted(groups)}
