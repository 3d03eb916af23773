"""The component registry (weights/components.py) is the one table of kinds: every kind's PyTorch reference class
resolves from it and the verifier compares every kind it lists."""

import importlib

import pytest

from iomm_jax.convert import verify
from iomm_jax.weights import components


@pytest.mark.parametrize("kind", ["mmdit", "s3dit", "vae", "rqa", "mllm"])
def test_each_kind_names_an_importable_reference(kind):
  spec = components.spec(kind)
  cls = getattr(importlib.import_module(spec.torch_module), spec.torch_class)
  assert cls.__name__ == spec.torch_class


def test_verifier_covers_every_kind_but_the_mllm_which_has_its_own():
  assert set(verify._COMPARE) == set(components.kinds()) - {"mllm"}


@pytest.mark.parametrize("kind", ["mmdit", "s3dit"])
def test_transformer_kind_comes_from_the_class_name_in_the_registry(kind):
  assert components.transformer_kind({"_class_name": components.spec(kind).torch_class}) == kind
  with pytest.raises(components.ConvertError, match="FluxTransformer2DModel.*ZImageTransformer2DModel"):
    components.transformer_kind({"_class_name": "UNet2DConditionModel"})
