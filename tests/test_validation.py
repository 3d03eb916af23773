"""Validation inside a training run: the held-out split (data.val_fraction / val_path / shapes' held-out draw), the
deterministic validation loss (the same on 1 and 8 devices, and before and after a resume), and sample grids with
validation rows for a folder source."""

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from iomm_jax import config as config_lib
from iomm_jax import config_validation
from iomm_jax import metrics, parallel
from iomm_jax.data import data_config, holdout, pipeline, sources
from iomm_jax.train import builder, loop, validation


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """40 captioned noise images (noise: a record read twice or from the wrong split shows in the pixels)."""
  root = tmp_path_factory.mktemp("val_folder")
  rng = np.random.default_rng(0)
  for i in range(40):
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    (root / f"{i:03d}.txt").write_text(f"a red circle number {i}")
  return root


# ------------------------------------------------------------------------------------------------ the split
def test_split_is_seeded_disjoint_and_complete():
  train, held = holdout.split_indices(1000, 0.05, seed=3)
  assert len(held) == 50 and len(train) == 950
  assert not set(train) & set(held) and set(train) | set(held) == set(range(1000))
  again_train, again_held = holdout.split_indices(1000, 0.05, seed=3)
  np.testing.assert_array_equal(held, again_held)
  np.testing.assert_array_equal(train, again_train)
  assert not np.array_equal(held, holdout.split_indices(1000, 0.05, seed=4)[1])  # data.seed changes the choice
  assert held.max() > 500  # a random choice, not the first records
  assert len(holdout.split_indices(10, 0.0, seed=0)[1]) == 0
  # ⌈fraction·n⌉: a small fraction of a small dataset still holds out a record (not 0, which would score nothing)
  assert len(holdout.split_indices(30, 0.01, seed=0)[1]) == 1 and len(holdout.split_indices(30, 0.1, seed=0)[1]) == 3
  assert len(holdout.split_indices(7, 0.5, seed=0)[1]) == 4
  assert len(holdout.split_indices(100, 0.07, seed=0)[1]) == 7  # not 8: 0.07 × 100 = 7.000000000000001 in binary


def test_training_never_reads_the_held_out_records(folder):
  d = data_config.from_config(source="folder", path=str(folder), resolution=16, vit_size=16, val_fraction=0.25)
  train, held = holdout.train_source(d), holdout.val_source(d)
  assert (len(train), len(held)) == (30, 10)
  held_ids = {held[i]["id"] for i in range(len(held))}
  assert len(held_ids) == 10 and not held_ids & {train[i]["id"] for i in range(len(train))}
  it = iter(pipeline.make_dataset(d, global_batch=10))  # the pipeline's own default source is the training split
  seen = {b.tobytes() for _ in range(6) for b in next(it)["pixels"]}  # two epochs
  held_pixels = {b.tobytes() for b in pipeline.load_examples(d, held, 10)["pixels"]}
  assert len(seen) == 30 and len(held_pixels) == 10 and not seen & held_pixels


@pytest.mark.parametrize("bad", ["missing", "zero-byte images"])
def test_a_wrong_val_path_stops_the_run_at_start_naming_it(folder, tmp_path, bad):
  """Checked before the first step when validation will run (not at the first eval, after checkpoints were written),
  and named as data.val_path, not the data.path it stands in for."""
  val = tmp_path / "val"
  if bad == "zero-byte images":
    val.mkdir()
    for i in range(3):
      (val / f"{i}.png").write_bytes(b"")
  work = tmp_path / "work"
  c = tiny_config("short", data__source="folder", data__path=str(folder), data__val_path=str(val))
  c.train.eval_every = 10
  with pytest.raises(data_config.DataConfigError) as e:
    loop.train(c, str(work))
  msg = str(e.value)
  assert "data.val_path" in msg and str(val) in msg and "\n" not in msg, msg
  assert "data.path" not in msg.replace("data.val_path", ""), msg
  assert list(work.iterdir()) == []


def test_val_path_and_shapes_heldout_draw(folder):
  d = data_config.from_config(source="folder", path="/nonexistent", val_path=str(folder), val_num=5)
  assert len(holdout.val_source(d)) == 40
  s = data_config.from_config(source="shapes", num_images=8, resolution=16, vit_size=16, val_num=3)
  held = holdout.val_source(s)
  assert len(held) == 3 and held.seed == s.shapes_seed + sources.HELDOUT_SEED_OFFSET
  # The held-out world follows the training world, not data.seed (which only orders the data): with the world moved
  # to the old held-out seed, no held-out image is a training image, and reordering keeps the validation set.
  for moved in (dict(shapes_seed=sources.HELDOUT_SEED_OFFSET), dict(seed=7)):
    m = data_config.from_config(source="shapes", num_images=8, resolution=16, vit_size=16, val_num=3, **moved)
    train, held = sources.make_source(m), holdout.val_source(m)
    assert all(not np.array_equal(held[i]["image"], train[i]["image"]) for i in range(3)), moved
    assert held.seed == m.shapes_seed + sources.HELDOUT_SEED_OFFSET
  assert holdout.val_source(data_config.from_config(source="folder", path=str(folder))) is None


def test_load_examples_match_the_training_preprocessing(folder):
  d = data_config.from_config(source="folder", path=str(folder), resolution=16, vit_size=16, val_fraction=0.25)
  held = holdout.val_source(d)
  ex = pipeline.load_examples(d, held, 4)
  want = pipeline.LoadExample(held, d)(pipeline.mix.Slot(2, 2))
  np.testing.assert_array_equal(ex["pixels"][2], want["pixels"])
  np.testing.assert_array_equal(ex["vit_pixels"][2], want["vit_pixels"])
  assert ex["pixels"].shape == (4, 16, 16, 3) and ex["has_caption"].all()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(data__val_fraction=0.7), "config.data.val_fraction=0.7"),
        (dict(data__val_fraction=0.1, data__val_path="/x"), "are both set"),
        (dict(data__val_num=0), "config.data.val_num=0"),
        (dict(train__eval_every=-1), "config.train.eval_every=-1"),
        (dict(train__eval_timesteps=(0.5, 1.5)), "config.train.eval_timesteps"),
    ],
)
def test_bad_holdout_settings_name_the_field(overrides, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.").replace("(", r"\(")):
    config_validation.validate(tiny_config("short", **overrides))


# ------------------------------------------------------------------------------------ the validation loss
def _validator(c, devices):
  import jax

  run = builder.build(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:devices]))
  held = validation.HeldOut(run, "")
  return run, validation.Validator(run, held)


@pytest.mark.slow
def test_validation_loss_is_the_same_on_1_and_8_devices():
  # 10 held-out rows in chunks of 8: the second chunk is padded, and the padding must not count.
  c = tiny_config("short", data__val_num=10)
  one_run, one = _validator(c, 1)
  eight_run, eight = _validator(c, 8)
  assert one.chunk == eight.chunk == 8 and len(one.weight) == 16 and one.weight.sum() == 10
  a, b = one(one_run.init_state().params), eight(eight_run.init_state().params)
  assert set(a) == {"val_loss_image", "val_loss_text", "val_loss_uncond", "val_seconds"}
  for k in ("val_loss_image", "val_loss_text", "val_loss_uncond"):
    np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
  again = one(one_run.init_state().params)
  assert all(again[k] == a[k] for k in a if k != "val_seconds")  # fixed noise, fixed masks: repeatable exactly

  # The losses are those of the held-out rows only: dropping the last two rows changes the mean.
  fewer_run, fewer = _validator(tiny_config("short", data__val_num=8), 1)
  f = fewer(fewer_run.init_state().params)
  assert f["val_loss_image"] != pytest.approx(a["val_loss_image"], rel=1e-6)


@pytest.mark.slow
def test_folder_run_logs_validation_and_grids_and_resumes_exactly(folder, tmp_path):
  def cfg():
    return tiny_config(
        "short",
        data__source="folder",
        data__path=str(folder),
        data__val_fraction=0.2,
        data__val_num=8,
        train__num_steps=4,
        train__log_every=2,
        train__ckpt_every=2,
        train__eval_every=2,
        train__sample_every=4,
    )

  straight, split = tmp_path / "straight", tmp_path / "split"
  loop.train(cfg(), str(straight))
  loop.train(cfg(), str(split), max_steps=2)
  loop.train(cfg(), str(split))

  def val_rows(w):
    rows = [r for r in metrics.read_metrics(str(w)) if "val_loss_image" in r]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("val_loss")} for r in rows]

  rows = val_rows(straight)
  assert [r["step"] for r in rows] == [2, 4]
  assert rows == val_rows(split)  # the same figures after a resume
  assert rows[0]["val_loss_image"] != rows[1]["val_loss_image"]  # it follows training
  grid = np.asarray(Image.open(straight / "samples" / "step_0000004.png"))
  c = cfg()
  rows_of_images = 2 + len(c.sample.prompts)  # held-out images, their reconstructions, one row per prompt
  upscale = max(1, 96 // c.data.resolution)
  assert grid.shape[0] == (rows_of_images * (c.data.resolution + 2) + 2) * upscale
  assert list((straight / "tensorboard").glob("events.*"))
  last = metrics.read_metrics(str(straight))[-1]  # one row per logged step: training, validation and grid figures
  assert last["step"] == 4 and {"loss", "val_loss_text", "grid_seconds"} <= set(last)


def test_the_shapes_world_is_its_shapes_seed_alone_rendered_or_written(tmp_path):
  """data.seed orders the data; the world (which images, which captions) is data.shapes_seed's, on the fly or written
  to a folder, and a record's caption is the caption of its own image."""
  from iomm_jax.data import shapes

  worlds = []
  for seed in (0, 7):
    d = data_config.from_config(
        source="shapes", num_images=4, resolution=16, vit_size=16, seed=seed, path=str(tmp_path / f"w{seed}")
    )
    src = sources.make_source(d)
    worlds.append(sorted((src[i]["caption"], src[i]["image_bytes"]) for i in range(len(src))))
  assert worlds[0] == worlds[1]  # the same pictures and captions
  live = sources.ShapesSource(4, 16, data_config.from_config(source="shapes").shapes_seed)
  assert [c for c, _ in worlds[0]] == sorted(live[i]["caption"] for i in range(4))
  for i in range(4):
    assert live.caption(i) == live[i]["caption"] == shapes.scene(i, live.seed)["caption"]
