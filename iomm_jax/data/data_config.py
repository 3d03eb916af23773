"""The data config: one frozen, validated object that the data package reads (never the raw ConfigDict).

``from_config(config.data)`` checks the section once with ``config_validation.validate_data`` and returns a
:class:`DataConfig` whose fields are exactly the schema's ``data.*`` fields (their meanings are documented in
``config.py``). Tests and tools build it the same way: ``from_config(source="folder", path=...)`` starts from the
schema defaults, so a field the schema lacks is an error here too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from iomm_jax import config as schema
from iomm_jax import config_validation


class DataConfigError(ValueError):
  """The data is not what the configuration says: a path that holds no data of its kind, records that cannot be
  used, features where images were expected. The message names the config field (data.path, data.val_path, …) and
  what to do; every app reports it as one line (train/user_errors.py). Never counted as a skipped record."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """``config.data`` as the data code sees it (see ``config.base_config`` for what each field means)."""

  source: str
  path: str
  num_images: int
  image_num_images: int
  resolution: int
  vit_size: int
  buckets: tuple
  recipe: str
  mix_lambda: float
  image_source: str
  image_path: str
  image_cache_path: str
  max_text_tokens: int
  skip_uncaptioned: bool
  num_workers: int
  prefetch_buffer: int
  seed: int
  cached: bool
  cache_path: str
  image_key: str
  caption_key: str
  split: str
  shapes_seed: int
  num_threads: int
  max_image_pixels: int
  min_image_side: int
  val_fraction: float
  val_path: str
  val_num: int

  @property
  def where(self) -> str:
    """Where the (pair) set's records come from, for error messages."""
    return self.cache_path if self.cached else (self.path or self.source)

  @property
  def image_where(self) -> str:
    """Where the separate image set of 'mix' lives ('' = none: image-only samples come from the pair set)."""
    if not self.image_source:
      return ""
    return self.image_cache_path if self.cached else (self.image_path or self.image_source)

  @property
  def has_image_set(self) -> bool:
    """'mix' reads its image-only samples from a separate image set (data.image_source)."""
    return bool(self.image_source)

  @property
  def has_holdout(self) -> bool:
    """A held-out set is configured (data.val_fraction or data.val_path)."""
    return bool(self.val_fraction or self.val_path)

  def as_image_set(self) -> DataConfig:
    """The image set of 'mix' as a source config of its own (source/path/cache_path/num_images replaced)."""
    return dataclasses.replace(
        self,
        source=self.image_source,
        path=self.image_path,
        cache_path=self.image_cache_path,
        num_images=self.image_num_images or self.num_images,
        image_source="",
        image_path="",
        image_cache_path="",
    )


def from_config(data: Any = None, **overrides: Any) -> DataConfig:
  """The validated :class:`DataConfig` of ``data`` (``config.data``, a mapping, or None = schema defaults) with
  ``overrides`` applied. An unknown or invalid field raises ``config.ConfigError`` naming it."""
  if isinstance(data, DataConfig) and not overrides:
    return data
  d = schema.base_config().data
  given: dict = {}
  if isinstance(data, DataConfig):
    given.update(dataclasses.asdict(data))
  elif data is not None:
    given.update(
        data.to_dict() if hasattr(data, "to_dict") else dict(data) if isinstance(data, Mapping) else vars(data)
    )
  given.update(overrides)
  for key, value in given.items():
    if key not in d:
      raise schema.ConfigError(
          f"config.data.{key} is not a field of the data config; known fields: " f"{', '.join(d.keys())}"
      )
    if isinstance(d[key], float) and isinstance(value, int):
      value = float(value)
    try:
      d[key] = value
    except TypeError as e:
      raise schema.ConfigError(f"config.data.{key}={value!r}: {e}") from None
  config_validation.validate_data(d)
  values = {k: d[k] for k in d.keys()}
  values["buckets"] = tuple((int(h), int(w)) for h, w in (d.buckets or ()))
  return DataConfig(**values)
