"""One data config (issue 13 item 1): built and validated once from config.data, its fields exactly the schema's,
its allowed sources the registry's, and a parquet source accepted at start and trained on through main."""

import glob
import json
import os
import re
import tokenize

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import ROOT, run_app, tiny_config
from iomm_jax import config as config_lib
from iomm_jax import config_validation
from iomm_jax import data_kinds
from iomm_jax.data import data_config, sources

DATA_CODE = sorted(glob.glob(os.path.join(ROOT, "iomm_jax", "data", "*.py"))) + [
    os.path.join(ROOT, "iomm_jax", name) for name in ("cache.py", "sample.py", "eval_recon.py")
]


def test_data_config_fields_are_the_schema_fields():
  dc = data_config.from_config(tiny_config("short").data)
  assert sorted(f.name for f in data_config.dataclasses.fields(dc)) == sorted(config_lib.base_config().data.keys())
  assert dc.source == "shapes" and dc.resolution == 32 and dc.num_threads == 2
  with pytest.raises(Exception):  # frozen
    dc.seed = 3


def test_sources_come_from_one_registry_and_parquet_is_accepted(tmp_path):
  assert config_validation.CHOICES["data.source"] == sources.SOURCES == data_kinds.SOURCES
  assert tuple(sources._MAKERS) == sources.SOURCES  # make_source handles exactly the allowed kinds
  assert config_validation.IMAGE_SOURCES == ("",) + sources.SOURCES
  config_validation.validate(tiny_config("short", data__source="parquet", data__path=str(tmp_path / "t.parquet")))
  with pytest.raises(config_lib.ConfigError, match=r"config.data.source='bogus' is not one of \('shapes'"):
    data_config.from_config(source="bogus", path="x")


def test_unknown_or_mistyped_field_names_it():
  with pytest.raises(config_lib.ConfigError, match=r"config.data.image_colum is not a field.*image_key"):
    data_config.from_config(source="shapes", image_colum="img")
  with pytest.raises(config_lib.ConfigError, match=r"config.data.num_threads=0 must be positive"):
    data_config.from_config(source="shapes", num_threads=0)
  with pytest.raises(config_lib.ConfigError, match=r"config.data.max_image_pixels=-1 must be >= 0"):
    data_config.from_config(source="shapes", max_image_pixels=-1)


def _strings(path: str) -> list[str]:
  with open(path, "rb") as f:
    return [t.string for t in tokenize.tokenize(f.readline) if t.type == tokenize.STRING]


def test_data_code_reads_and_names_only_schema_fields():
  """No `getattr(cfg, field, default)` reads of config fields, and every `data.X` a message tells a user to set is a
  field of the schema (error messages never name a field the locked config would reject)."""
  fields = set(config_lib.base_config().data.keys())
  modules = {os.path.basename(p)[:-3] for p in DATA_CODE}
  named = set()
  for path in DATA_CODE:
    text = open(path).read()
    assert not re.search(r"getattr\((data_cfg|config\.data|cfg|d|spec|self\.spec)\b", text), path
    for s in _strings(path):
      named |= {m for m in re.findall(r"(?<![\w.])data\.([a-z_]+)", s) if m not in modules}
  assert named and named <= fields, sorted(named - fields)
  assert {"image_key", "split", "max_image_pixels", "image_source"} <= named  # the scan sees the messages


@pytest.mark.slow
def test_parquet_source_trains_through_main(tmp_path):
  from iomm_jax.data import shapes

  rows = [shapes.render_png(i, 64, 0) for i in range(16)]
  table = pa.table(
      {
          "image": pa.array(
              [{"bytes": b, "path": None} for b, _ in rows], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
          ),
          "caption": [c for _, c in rows],
      }
  )
  pq.write_table(table, tmp_path / "train.parquet", row_group_size=5)
  r = run_app(
      "iomm_jax.main",
      "--config=configs/tiny.py:pretrain,short",
      "--config.data.source=parquet",
      f"--config.data.path={tmp_path / 'train.parquet'}",
      "--config.train.num_steps=3",
      "--config.train.global_batch=8",
      "--config.train.ckpt_every=3",
      f"--workdir={tmp_path / 'w'}",
      timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
  assert rows[-1]["step"] == 3 and all(row.get("skipped", 0) == 0 for row in rows)
