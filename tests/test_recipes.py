"""The training recipes end to end on the tiny config: each runs a step; the mix is λ in expectation and seeded;
caption-less records fail a pair recipe at start (or are counted with skip_uncaptioned); 5% bad images train to
the end through main with the skips in metrics.jsonl."""

import sys

import numpy as np
import pytest
from array_record.python import array_record_module as ar

from helpers import ROOT, tiny_config
from iomm_jax import metrics
from iomm_jax.data import pipeline, records, shapes
from iomm_jax.train import loop

# Steps are compiled once per distinct step graph: 'image' and 'mix' share one, the two pair recipes another
# (no ViT). Keep every HLO-relevant field equal across tests (batch 8, tiny defaults) so the session-wide compilation cache (tests/conftest.py) hits.
STEP = dict(train__sample_every=0, train__num_steps=1, train__log_every=1)


def write_pngs(folder, n, res, uncaptioned=()):
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    png, cap = shapes.render_png(i, res, 0)
    (folder / f"{i:03d}.png").write_bytes(png)
    if i not in uncaptioned:
      (folder / f"{i:03d}.txt").write_text(cap)
  return folder


@pytest.mark.parametrize(
    "arg,recipe,stage",
    [
        ("pair_pretrain", "pair", "pretrain"),
        ("finetune", "mix", "finetune"),
        ("finetune_pair", "pair", "finetune"),
        ("finetune_image", "image", "finetune"),
    ],
)
@pytest.mark.slow
def test_each_recipe_trains_a_step(arg, recipe, stage, tmp_path):
  c = tiny_config(arg, **STEP)
  assert (c.data.recipe, c.train.stage) == (recipe, stage)
  out = loop.train(c, str(tmp_path))
  assert out["step"] == 1 and np.isfinite(out["loss"]) and out["skipped_total"] == 0


def _fake_cache(path, n=64):
  """A feature cache of n tiny records (the mix draw does not look at the features)."""
  path.mkdir()
  w = ar.ArrayRecordWriter(str(path / "features-00000-of-00001-00000-of-00001.array_record"), "group_size:1")
  for i in range(n):
    w.write(
        records.encode_feature_record(
            id=f"r{i}",
            vit_tokens=np.zeros((2, 2), np.float16),
            latent=np.zeros((2, 2, 1), np.float16),
            caption_ids=np.arange(3) + 1,
            caption=f"c{i}",
        )
    )
  w.close()
  return path


def _image_only(c, batches=300):
  it = iter(pipeline.make_dataset(c.data, global_batch=c.train.global_batch))
  return np.concatenate([next(it)["is_image_only"] for _ in range(batches)])


@pytest.mark.parametrize("lam", [0.5, 0.2])
def test_mix_fraction_is_lambda_and_reproducible(lam, tmp_path):
  cache = _fake_cache(tmp_path / "cache")
  # One cached set: its images serve as the image-only half (the tiny config's separate image set is tested in
  # test_tiny_stages / test_mix_source).
  c = tiny_config(
      "finetune",
      data__cached=True,
      data__cache_path=str(cache),
      data__mix_lambda=lam,
      data__image_source="",
      data__image_num_images=0,
  )
  assert c.data.recipe == "mix"
  a = _image_only(c)
  n = a.size
  assert abs(a.mean() - lam) <= 3 * np.sqrt(lam * (1 - lam) / n), (a.mean(), lam, n)
  np.testing.assert_array_equal(a, _image_only(c))  # the same seed gives the same draws
  c.data.seed = 1
  assert (a != _image_only(c)).mean() > 0.1  # and another seed other draws


@pytest.mark.slow
def test_uncaptioned_record_fails_a_pair_recipe_at_start(tmp_path):
  folder = write_pngs(tmp_path / "imgs", 16, 32, uncaptioned=(3,))
  c = tiny_config("finetune_pair", data__source="folder", data__path=str(folder), **STEP)
  with pytest.raises(pipeline.DataConfigError, match=r"record '003.png' \(index 3\).*no caption.*skip_uncaptioned"):
    loop.train(c, str(tmp_path / "run"))
  assert not metrics.read_metrics(tmp_path / "run")  # failed before any step
  # with the flag the record is counted and skipped, and training runs
  c.data.skip_uncaptioned = True
  it = iter(pipeline.make_dataset(c.data, global_batch=8))
  batches = [next(it) for _ in range(4)]  # 32 draws: two epochs of 16, record 3 drawn twice
  assert sum(int(b["skipped_uncaptioned"].sum()) for b in batches) == 2
  assert all(b["has_caption"].all() for b in batches)
  assert 3 not in np.concatenate([b["index"] for b in batches])
  out = loop.train(c, str(tmp_path / "run_skip"))
  assert out["step"] == 1 and np.isfinite(out["loss"])


@pytest.mark.slow
def test_five_percent_bad_images_train_to_the_end_through_main(tmp_path, monkeypatch):
  """40 images, one zero-byte and one truncated (5%): main trains one epoch; metrics count both skips."""
  from absl import flags

  from iomm_jax import main as main_lib

  folder = write_pngs(tmp_path / "imgs", 40, 32)
  (folder / "011.png").write_bytes(b"")
  (folder / "027.png").write_bytes((folder / "027.png").read_bytes()[:60])
  argv = [
      "main",
      f"--config={ROOT}/configs/tiny.py:finetune_image",
      "--config.train.global_batch=8",
      "--config.data.num_images=256",
      "--config.train.sample_every=0",
      "--config.train.num_steps=5",
      "--config.train.log_every=5",
      "--config.data.source=folder",
      f"--config.data.path={folder}",
      f"--workdir={tmp_path / 'run'}",
  ]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its --config.* overrides from sys.argv
  try:
    flags.FLAGS(argv)
    assert main_lib.main(["main"]) == 0
  finally:
    flags.FLAGS.unparse_flags()
    flags.FLAGS.mark_as_parsed()
  rows = metrics.read_metrics(tmp_path / "run")
  assert rows[-1]["step"] == 5 and np.isfinite(rows[-1]["loss"])
  assert rows[-1]["skipped_total"] == 2  # 5 steps × 8 = one epoch: each bad image drawn once, replaced, counted
