"""One dtype vocabulary (iomm_jax.dtype_names) for configs, the converter, the feature cache and the benches."""

import argparse

import ml_dtypes
import numpy as np
import pytest

from iomm_jax import config_validation, dtype_names
from iomm_jax.cache import STORED_DTYPES
from iomm_jax.models import factory
from iomm_jax.weights import transfer


def test_short_forms_name_the_same_dtype():
  assert [dtype_names.canonical(s) for s in ("fp32", "bf16", "fp16")] == ["float32", "bfloat16", "float16"]
  assert dtype_names.numpy_dtype("bf16") is ml_dtypes.bfloat16 and dtype_names.numpy_dtype("float16") is np.float16


def test_refusal_names_the_flag_and_what_it_accepts():
  with pytest.raises(ValueError, match=r"^--out_dtype='float16' is not one of float32, bfloat16 \(or fp32, bf16\)$"):
    dtype_names.canonical("float16", ("float32", "bfloat16"), flag="--out_dtype")
  parse = dtype_names.argparse_type(("float32",), "--dtype")
  assert parse("fp32") == "float32"
  with pytest.raises(argparse.ArgumentTypeError, match="'bf16' is not one of float32"):
    parse("bf16")


def test_every_consumer_draws_from_the_one_table():
  for allowed in (tuple(factory.DTYPES), transfer.CAST_DTYPES, STORED_DTYPES):
    assert set(allowed) <= set(dtype_names.NAMES), allowed
  assert config_validation.CHOICES["model.dtype"] == tuple(factory.DTYPES) == ("float32", "bfloat16")
  assert {n: np.dtype(t) for n, t in factory.DTYPES.items()} == {
      n: np.dtype(dtype_names.numpy_dtype(n)) for n in factory.DTYPES
  }
