"""Key mapping between our NNX parameter paths and PyTorch state-dict keys, as data.

A component's mapping is a `KeyTable`: an ordered list of `Rule`s (regex on our dotted path → template of
the PyTorch key, plus the name of an invertible transform), falling back to the default rule every module in
`iomm_jax.models` follows by construction:

    ours  `a.b.kernel` (2-D, (in, out))   ↔  torch `a.b.weight` (out, in)        transform 'linear'
    ours  `a.b.kernel` (4-D, HWIO)        ↔  torch `a.b.weight` (OIHW)           transform 'conv'
    ours  `a.b.embedding`                 ↔  torch `a.b.weight`                  transform 'identity'
    anything else                         ↔  the same dotted key                 transform 'identity'

`to_torch` and `to_jax` apply the table in both directions and are strict: a missing, unexpected or
mis-shaped key raises `KeyMismatchError` listing every offender. Arrays are numpy (any dtype, bf16 via
ml_dtypes) and keep their dtype; transforms only permute axes, so a round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import numpy as np

from iomm_jax import tree_paths


def _linear(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.T)


def _conv_to_torch(x: np.ndarray) -> np.ndarray:  # HWIO -> OIHW
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


def _conv_to_jax(x: np.ndarray) -> np.ndarray:  # OIHW -> HWIO
  return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def _identity(x: np.ndarray) -> np.ndarray:
  return x


# name -> (ours -> torch, torch -> ours)
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "identity": (_identity, _identity),
    "linear": (_linear, _linear),
    "conv": (_conv_to_torch, _conv_to_jax),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """`ours` is a regex over our dotted path (full match); `torch` is its PyTorch key, with \\1.. groups."""

  ours: str
  torch: str
  transform: str = "identity"


class KeyMismatchError(ValueError):
  """Raised when a state dict does not match the model: lists missing, unexpected and mis-shaped keys."""

  HINT = "  Check that --component and the config (sizes, depths) match the checkpoint."

  def __init__(self, component: str, missing=(), unexpected=(), misshaped=(), hint: str = HINT):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    lines = [f"{component}: the checkpoint does not match the model."]
    if self.missing:
      lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing[:50]))
    if self.unexpected:
      lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected[:50]))
    if self.misshaped:
      lines.append(
          f"  wrong shape ({len(self.misshaped)}): "
          + ", ".join(f"{k} (checkpoint {a}, model {b})" for k, a, b in self.misshaped[:50])
      )
    lines.append(hint)
    super().__init__("\n".join(lines))


@dataclasses.dataclass
class KeyTable:
  """The mapping of one component. `rules` are tried in order before the default rule."""

  component: str
  rules: list[Rule] = dataclasses.field(default_factory=list)
  # PyTorch keys that exist in the reference but carry no parameter for us (e.g. buffers); dropped on load.
  ignore_torch: list[str] = dataclasses.field(default_factory=list)

  def torch_key(self, ours: str, ndim: int) -> tuple[str, str]:
    """(torch key, transform name) for one of our dotted paths."""
    for rule in self.rules:
      m = re.fullmatch(rule.ours, ours)
      if m:
        return m.expand(rule.torch), rule.transform
    head, _, leaf = ours.rpartition(".")
    if leaf == "kernel":
      return f"{head}.weight", ("conv" if ndim == 4 else "linear")
    if leaf == "embedding":
      return f"{head}.weight", "identity"
    return ours, "identity"

  def ignored(self, torch_key: str) -> bool:
    return any(re.fullmatch(p, torch_key) for p in self.ignore_torch)


def to_torch(ours: Mapping[str, np.ndarray], table: KeyTable) -> dict[str, np.ndarray]:
  """Our flat {dotted path: array} → a PyTorch-layout state dict."""
  out = {}
  for path, value in ours.items():
    key, tname = table.torch_key(path, np.ndim(value))
    if key in out:
      raise ValueError(f"{table.component}: two parameters map to torch key {key!r}; the key table is wrong")
    out[key] = TRANSFORMS[tname][0](np.asarray(value))
  return out


def to_jax(
    theirs: Mapping[str, np.ndarray], table: KeyTable, expected: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
  """A PyTorch-layout state dict → our flat {dotted path: array}, checked against `expected` shapes.

  `expected` maps every one of our dotted paths to its shape (from `jax.eval_shape` of the model).
  Raises KeyMismatchError listing every missing, unexpected or mis-shaped key.
  """
  wanted = {}
  for path, shape in expected.items():
    key, tname = table.torch_key(path, len(shape))
    wanted[key] = (path, tname, tuple(shape))
  missing = sorted(k for k in wanted if k not in theirs)
  unexpected = sorted(k for k in theirs if k not in wanted and not table.ignored(k))
  out, misshaped = {}, []
  for key, (path, tname, shape) in wanted.items():
    if key not in theirs:
      continue
    value = TRANSFORMS[tname][1](np.asarray(theirs[key]))
    if tuple(value.shape) != shape:
      misshaped.append((key, tuple(np.shape(theirs[key])), shape))
      continue
    out[path] = value
  if missing or unexpected or misshaped:
    raise KeyMismatchError(table.component, missing, unexpected, misshaped)
  return out


def flatten_state(state) -> dict[str, object]:
  """nnx.State (or nested dict) → {dotted path: leaf value}."""
  from flax import nnx

  if not isinstance(state, nnx.State):
    return {path: (v.get_value() if hasattr(v, "get_value") else v) for path, v in tree_paths.flatten(state).items()}
  flat = {}
  for path, leaf in nnx.to_flat_state(state):
    value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
    flat[".".join(str(p) for p in path)] = value
  return flat
