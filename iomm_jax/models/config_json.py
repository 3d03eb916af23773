"""A PyTorch config.json's architecture fields checked against our config classes' annotations, before anything is
built from them: a hand-edited `"num_layers": "two"`, a head count of 0, a negative scale or a NaN epsilon is one
line naming the file and the field, not a traceback or a shape error deep inside a build.

`Sections` says where a file's fields are typed: (a dotted prefix, '' = the top level; the config class whose
field annotations type that section's fields of the same name). Rules: integers are not booleans and are at least
1 (sizes), numbers are finite and above 0 (scales, rates, epsilons), lists hold what the annotation's tuple holds;
`types` overrides an annotation where the file types a field otherwise than ours (transformers writes sizes as
[h, w]); `zero_ok` names the fields that may be 0 (a depth of no blocks, a token id) or, for numbers, of any sign
(the VAE's latent shift). Fields the classes do not know are left to the config mappings, which name them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types as _types
import typing
from typing import Any, Mapping

Sections = tuple[tuple[str, type], ...]


class FieldTypeError(ValueError):
  """A config.json field whose value our builder cannot take; the message names the file and the field."""


def check(
    sections: Sections, config: Mapping[str, Any], where, *, types=None, zero_ok=(), torch_class: str | None = None
) -> None:
  """Raises FieldTypeError for the first field of `config` (read from `where`) that does not fit its annotation.
  A config whose `_class_name` is not `torch_class` (another model's, whose fields mean something else) is left to
  the config mappings, which say what it is."""
  if torch_class and config.get("_class_name", torch_class) != torch_class:
    return
  types = types or {}
  for section, cls in sections:
    fields = config.get(section) if section else config
    if not isinstance(fields, Mapping):  # a missing or malformed section: the config mapping says which
      continue
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      if f.name not in fields:
        continue
      value = fields[f.name]
      hint, least = types.get(f.name, hints[f.name]), 0 if f.name in zero_ok else 1
      if not _fits(value, hint, least):
        name = f"{section}.{f.name}" if section else f.name
        raise FieldTypeError(
            f"{where}: {name}={json.dumps(value)} must be {_describe(hint, least)}; correct that field of the config"
        )


def _fits(value, hint, least: int) -> bool:
  """Whether a JSON value fits a config field annotated `hint` (integers: not booleans, at least `least`)."""
  if typing.get_origin(hint) in (_types.UnionType, typing.Union):
    return any(_fits(value, h, least) for h in typing.get_args(hint))
  if typing.get_origin(hint) is tuple:
    return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0], least) for v in value)
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least
  if hint is float:  # JSON may hold NaN or Infinity (Python's json reads both): no field means either
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (least == 0 or value > 0)
    )
  if hint is str:
    return isinstance(value, str)
  return True  # a nested config (InternVLConfig.vision): checked as its own section


def _describe(hint, least: int, plural: bool = False) -> str:
  """What `_fits` wants, in words: 'an integer >= 1', 'a list of integers >= 1 or null', ..."""
  if typing.get_origin(hint) in (_types.UnionType, typing.Union):
    return " or ".join(_describe(h, least, plural) for h in typing.get_args(hint))
  if typing.get_origin(hint) is tuple:
    return ("lists" if plural else "a list") + " of " + _describe(typing.get_args(hint)[0], least, plural=True)
  above = " > 0" if least else ""
  words = {
      type(None): ("null", "null"),
      bool: ("true or false", "true or false"),
      int: (f"an integer >= {least}", f"integers >= {least}"),
      float: ("a finite number" + above, "finite numbers" + above),
      str: ("a string", "strings"),
  }
  return words.get(hint, ("an object", "objects"))[plural]
