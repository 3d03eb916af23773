"""The DiT family registry: the config's allowed kinds are its keys, and a generator of each kind builds its
family's module and predicts through it."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from iomm_jax import config_validation
from iomm_jax.config import ConfigError
from iomm_jax.models import dit_families, factory


def test_config_accepts_each_registered_kind_and_no_other():
  from helpers import tiny_config

  for kind in dit_families.DIT_FAMILIES:
    config_validation.validate(tiny_config("short", model__dit__kind=kind))
  with pytest.raises(ConfigError, match=r"config.model.dit.kind='unet' is not one of \('mmdit', 's3dit'\)"):
    config_validation.validate(tiny_config("short", model__dit__kind="unet"))


def test_unknown_kind_is_one_line_naming_the_known_ones():
  with pytest.raises(ValueError, match=r"config.model.dit.kind='unet'.*mmdit.*s3dit"):
    dit_families.family("unet")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mmdit", "s3dit"])
def test_generator_of_each_kind_runs_its_family(kind):
  from helpers import tiny_config, with_tiny_s3dit

  c = tiny_config()
  if kind == "s3dit":
    c = with_tiny_s3dit(c, n_layers=1)
  gen = factory.make_generator(c, nnx.Rngs(0))
  fam = dit_families.family(kind)
  assert isinstance(gen.dit, fam.module) and dit_families.family_of(gen.dit) is fam
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 12))
  h = jax.random.normal(jax.random.key(1), (2, 16, gen.rqa.cfg.dim))
  mask = jnp.ones((2, 16), bool)
  v = gen.velocity(x, jnp.array([0.3, 0.9]), h, mask)
  assert v.shape == x.shape and bool(jnp.all(jnp.isfinite(v)))
