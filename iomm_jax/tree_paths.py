"""Nested parameter dicts ↔ flat {dotted path: leaf} maps: the one implementation every layer uses (weights I/O,
key tables, shardings, config diffs)."""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[str, Any]:
  """{'a': {'b': x, 0: y}} → {'a.b': x, 'a.0': y}; keys become strings, only Mappings are descended into."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[".".join(path)] = value
  return out


def nest(flat: Mapping[Any, Any], *, int_keys: bool = False) -> dict:
  """The inverse of `flatten`: keys are dotted strings or tuples of path parts. With `int_keys`, all-digit parts
  of dotted keys become ints (the indices of nnx.List layer stacks)."""
  out: dict = {}
  for key, value in flat.items():
    parts = tuple(key) if isinstance(key, tuple) else key.split(".")
    if int_keys:
      parts = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in parts)
    node = out
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return out
