"""Floating-point dtype names: one vocabulary for every config field and command-line flag.

Names are numpy's ("float32", "bfloat16", "float16"), as config.json, the component metadata and safetensors
headers spell them. Wherever a name comes from a user, the short forms "fp32", "bf16", "fp16" are accepted too and
mean the same. Each consumer states which of the names it supports (a subset of NAMES) next to the code that acts
on the value: the model computes in float32 or bfloat16, the converter casts to float32 or bfloat16, the feature
cache stores float16 or float32.
"""

import ml_dtypes
import numpy as np

NAMES = ("float32", "bfloat16", "float16")
SHORT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_NUMPY = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def canonical(name: str, allowed: tuple[str, ...] = NAMES, *, flag: str = "dtype") -> str:
  """`name` (a numpy name or its short form) as its numpy name; ValueError naming `flag` and the accepted names
  when it is not one of `allowed`."""
  full = SHORT.get(name, name)
  if full not in allowed:
    shorts = [s for n in allowed for s, m in SHORT.items() if m == n]
    raise ValueError(f"{flag}={name!r} is not one of {', '.join(allowed)} (or {', '.join(shorts)})")
  return full


def numpy_dtype(name: str):
  """The numpy scalar type for a dtype name or its short form (bfloat16 is ml_dtypes')."""
  return _NUMPY[canonical(name)]


def argparse_type(allowed: tuple[str, ...], flag: str):
  """An argparse `type=` that accepts `allowed`'s names and short forms and returns the numpy name."""
  import argparse

  def parse(value: str) -> str:
    try:
      return canonical(value, allowed, flag=flag)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None

  parse.__name__ = "dtype"  # argparse names the type in its message: "invalid dtype value"
  return parse
