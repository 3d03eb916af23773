"""Aspect-ratio buckets (data.buckets): assignment, cover crop, one static shape per global batch, the batch schedule,
worker/process independence, exact resume, skips within a bucket, prepare's sizes sidecar, and two training steps."""

import pickle

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import assert_batches_equal, copy_folder, take, tiny_config
from iomm_jax import config as config_lib
from iomm_jax import config_validation
from iomm_jax.data import buckets, data_config, decode, pipeline, prepare, prepare_items, sources

BUCKETS = ((32, 32), (16, 48), (48, 16))  # square, wide (3:1), tall (1:3)
VIT, T, G = 14, 6, 8
# (height, width) of the test images: 24 near-square, 16 wide, 8 tall → 3, 2 and 1 batches of 8 per epoch
SIZES = [(40, 40), (36, 44)] * 12 + [(24, 72), (20, 50)] * 8 + [(72, 24)] * 8


def expected_bucket(h, w):
  return int(np.argmin([abs(np.log(w / h) - np.log(bw / bh)) for bh, bw in BUCKETS]))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Random-noise images of the sizes above (noise: any wrong crop or resize shows in the pixels)."""
  root = tmp_path_factory.mktemp("aspect")
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate(SIZES):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    (root / f"{i:03d}.txt").write_text(f"image number {i}")
  return root


def cfg(path, **kw):
  base = dict(
      source="folder",
      path=str(path),
      num_images=0,
      resolution=32,
      vit_size=VIT,
      recipe="image",
      mix_lambda=0.5,
      num_workers=0,
      seed=0,
      max_text_tokens=T,
      skip_uncaptioned=False,
      cached=False,
      cache_path="",
      prefetch_buffer=2,
      buckets=BUCKETS,
  )
  base.update(kw)
  return data_config.from_config(**base)


# ------------------------------------------------------------------------------------------- pure functions
def test_assignment_is_nearest_aspect_in_log_space():
  sizes = np.array([(100, 100), (100, 190), (100, 310), (300, 100), (100, 150), (0, 0), (90, 110)])
  # 190/100: log 0.64 is nearer log 3 (1.10) than log 1 (0); 150/100: log 0.41 is nearer 0; unknown → square
  assert buckets.assign(sizes, BUCKETS).tolist() == [0, 1, 1, 2, 0, 0, 0]
  assert buckets.assign(np.array([(10, 20)]), ((8, 16), (16, 32))).tolist() == [0]  # equal ratios: the first


def test_check_buckets_names_the_field():
  assert buckets.check_buckets([[32, 48]]) == ((32, 48),)
  for bad, msg in (
      (((30, 32),), "multiples of 16"),
      (((32,),), "pairs"),
      ("abc", "pairs"),
      (((32, 32), (32, 32)), "twice"),
      (((0, 32),), "positive"),
  ):
    with pytest.raises(ValueError, match=rf"data.buckets.*{msg}"):
      buckets.check_buckets(bad)
  c = tiny_config("short")
  c.data.buckets = ((32, 30),)
  with pytest.raises(config_lib.ConfigError, match=r"config.data.buckets: bucket \(32, 30\)"):
    config_validation.validate(c)
  c = tiny_config("short", data__buckets=BUCKETS, data__cached=True, data__cache_path="x")
  with pytest.raises(config_lib.ConfigError, match=r"config.data.buckets is not supported with config.data.cached"):
    config_validation.validate(c)
  with pytest.raises(config_lib.ConfigError, match=r"config.data.buckets is not supported with config.data.cached"):
    cfg("x", cached=True, cache_path="x")  # the data config is checked by the schema's own function
  config_validation.validate(tiny_config("short", data__buckets=BUCKETS))


def test_cover_crop_keeps_the_centre_and_equals_the_square_path():
  arr = np.zeros((40, 80, 3), np.uint8)
  arr[:6] = arr[-6:] = 255  # white bands at top and bottom, outside the centre 80×26.7 region
  px, vit = decode.views(Image.fromarray(arr), 16, VIT, width=48)
  assert px.shape == (16, 48, 3) and vit.shape == (VIT, VIT, 3)
  np.testing.assert_allclose(px[1:-1], -1.0, atol=1e-6)  # only black survives (edge rows blend a little)
  rng = np.random.default_rng(1)
  im = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
  px, vit = decode.views(im, 32, VIT, width=32)  # a square bucket: the centre square (columns 10..40), one resize
  want = np.asarray(im.resize((32, 32), Image.Resampling.BICUBIC, box=(10, 0, 40, 30)), np.float32) / 127.5 - 1
  np.testing.assert_array_equal(px, want)
  np.testing.assert_array_equal(
      vit, decode.vit_normalize(im.resize((VIT, VIT), Image.Resampling.BICUBIC, box=(10, 0, 40, 30)))
  )


def test_schedule_proportions_counts_and_random_access():
  sizes = [40, 13, 5, 0]
  s = buckets.BucketSchedule(sizes, 8, seed=2)
  seq = [s.batch(k) for k in range(400)]
  labels = np.array([b for b, _ in seq])
  for b, n in enumerate(sizes):  # each bucket drawn in proportion to its size (exact per epoch, up to rounding)
    assert abs((labels == b).sum() - 400 * n / sum(sizes)) <= 1.5, b
  for k, (b, c) in enumerate(seq):  # c = number of earlier batches of the same bucket
    assert c == int((labels[:k] == b).sum())
  fresh = pickle.loads(pickle.dumps(s))
  for k in (399, 0, 250, 17, 18):  # random access, out of order, in a copy
    assert fresh.batch(k) == seq[k]
  assert [buckets.BucketSchedule(sizes, 8, seed=3).batch(k)[0] for k in range(400)] != labels.tolist()


# ---------------------------------------------------------------------------------------------- the pipeline
def test_every_batch_is_one_bucket_with_the_right_crops(folder):
  it = iter(pipeline.make_dataset(cfg(folder), global_batch=G))
  batches = take(it, 12)  # two epochs of 6 batches
  src = sources.FolderSource(folder)
  seen = []
  for b in batches:
    (k,) = set(b["bucket"].tolist())  # one bucket per batch ...
    assert b["pixels"].shape == (G, *BUCKETS[k], 3) and b["vit_pixels"].shape == (G, VIT, VIT, 3)  # ... one shape
    seen.append(k)
    for row in (0, G - 1):
      i = int(b["index"][row])
      assert expected_bucket(*SIZES[i]) == k  # the record belongs to the batch's bucket
      px, vit = decode.views(decode.to_rgb(src[i]), BUCKETS[k][0], VIT, width=BUCKETS[k][1])
      np.testing.assert_array_equal(b["pixels"][row], px)
      np.testing.assert_array_equal(b["vit_pixels"][row], vit)
  assert sorted(seen[:6]) == [0, 0, 0, 1, 1, 2] and sorted(seen[6:]) == [0, 0, 0, 1, 1, 2]  # sizes 24/16/8
  assert seen[:6] != seen[6:] or seen[:6] != sorted(seen[:6])  # interleaved in a seeded order
  idx = np.concatenate([b["index"] for b in batches[:6]])
  assert sorted(idx.tolist()) == list(range(len(SIZES)))  # an epoch: every record exactly once


@pytest.mark.slow
def test_same_batches_for_workers_and_processes(folder):
  c = cfg(folder, recipe="mix")
  ref = take(iter(pipeline.make_dataset(c, global_batch=G)), 6)
  assert_batches_equal(
      take(iter(pipeline.make_dataset(cfg(folder, recipe="mix", num_workers=2), global_batch=G)), 6), ref
  )
  parts = [take(iter(pipeline.make_dataset(c, global_batch=G, process_index=p, process_count=2)), 6) for p in range(2)]
  for p in range(2):
    assert all(b["pixels"].shape[0] == G // 2 for b in parts[p])
  joined = [{k: np.concatenate([parts[0][n][k], parts[1][n][k]]) for k in ref[n]} for n in range(6)]
  assert_batches_equal(joined, ref)


def test_resume_from_iterator_state_is_exact(folder):
  it = iter(pipeline.make_dataset(cfg(folder), global_batch=G))
  take(it, 4)
  state = it.get_state()
  expected = take(it, 4)  # crosses the epoch boundary
  it2 = iter(pipeline.make_dataset(cfg(folder), global_batch=G))
  it2.set_state(state)
  assert_batches_equal(take(it2, 4), expected)


def test_unreadable_record_is_replaced_within_its_bucket(folder, tmp_path):
  bad = copy_folder(folder, tmp_path / "bad")
  (bad / "030.png").write_bytes(b"")  # a wide image (index 30): size unknown → listed in the square bucket
  (bad / "005.png").write_bytes(b"garbage")  # a square one
  batches = take(iter(pipeline.make_dataset(cfg(bad), global_batch=G)), 6)  # one epoch
  idx = np.concatenate([b["index"] for b in batches])
  skipped = np.concatenate([b["skipped"] for b in batches])
  bucket = np.concatenate([b["bucket"] for b in batches])
  assert skipped.sum() == 2 and not {5, 30} & set(idx.tolist())
  assert (bucket[skipped > 0] == 0).all()  # drawn, counted and replaced inside the bucket they were listed in:
  assert sorted(idx[skipped > 0].tolist()) == [0, 6]  # the next record of the square list (30 is its last)


# -------------------------------------------------------------------------------------- prepare's sidecar
def test_prepare_writes_a_sizes_sidecar_that_record_sizes_uses(folder, tmp_path, monkeypatch):
  dst = tmp_path / "shards"
  items = prepare_items.enumerate_items(str(folder))
  prepare.write_shards(items, dst, 3, min_size=0, progress=False)
  src = sources.ArrayRecordSource(dst)
  want = np.array([SIZES[int(src[i]["caption"].split()[-1])] for i in range(len(src))])
  for p in src.paths:
    assert prepare.sizes_path(p).is_file()
  with monkeypatch.context() as m:  # the sidecar is enough: no record is read
    m.setattr(sources.ArrayRecordSource, "__getitem__", lambda self, i: 1 / 0)
    np.testing.assert_array_equal(buckets.record_sizes(src), want)
  prepare.sizes_path(src.paths[1]).unlink()  # as written by an older prepare: records are read instead
  np.testing.assert_array_equal(buckets.record_sizes(src), want)
  summary = prepare.write_shards(items, dst, 3, min_size=0, progress=False)  # a rerun backfills it
  assert summary["shards_already_done"] == 3 and prepare.sizes_path(src.paths[1]).is_file()
  with monkeypatch.context() as m:
    m.setattr(sources.ArrayRecordSource, "__getitem__", lambda self, i: 1 / 0)
    np.testing.assert_array_equal(buckets.record_sizes(src), want)
  b = next(iter(pipeline.make_dataset(cfg(dst, source="arrayrecord"), global_batch=G)))
  assert b["pixels"].shape[1:3] == BUCKETS[int(b["bucket"][0])]


# -------------------------------------------------------------------------------------------------- training
@pytest.mark.slow  # one in-process training run: ≈1 min of compile on 2 busy CPU cores
def test_two_training_steps_with_buckets(folder, tmp_path):
  """configs/tiny.py:short with data.buckets: two steps of main's loop on a non-square bucket; the step then also
  lowers for the other two bucket shapes (one XLA compile only: each compile of the tiny step costs ~30 s here)."""
  from iomm_jax import metrics, parallel
  from iomm_jax.train import builder, loop

  lists = buckets.bucket_lists(sources.FolderSource(folder), BUCKETS)
  sizes = [len(x) for x in lists]
  seed = next(
      s
      for s in range(100)  # a data seed whose first two batches are both from the wide bucket
      if [buckets.BucketSchedule(sizes, G, s).batch(k)[0] for k in (0, 1)] == [1, 1]
  )
  c = tiny_config(
      "short",
      data__source="folder",
      data__path=str(folder),
      data__buckets=BUCKETS,
      data__seed=seed,
      train__num_steps=2,
      train__log_every=1,
  )
  config_validation.validate(c)
  assert c.train.global_batch == G
  first = take(iter(pipeline.make_dataset(c.data, global_batch=G)), 2)
  assert [b["pixels"].shape[1:3] for b in first] == [(16, 48), (16, 48)]
  out = loop.train(c, str(tmp_path / "run"))
  rows = metrics.read_metrics(tmp_path / "run")
  assert out["step"] == 2 and [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)

  run = builder.build(c, load_frozen=False)
  it = iter(pipeline.make_dataset(c.data, global_batch=G, tokenize=run.tokenize))
  shapes = {}
  for b in take(it, 6):  # one epoch: every bucket
    shapes.setdefault(b["pixels"].shape[1:3], b)
  assert set(shapes) == set(BUCKETS)
  abstract_frozen = jax.eval_shape(lambda: builder.load_frozen_weights(c, run))
  for hw, b in shapes.items():  # trace + lower the jitted step for the other bucket shapes (no XLA compile)
    if hw == (16, 48):
      continue  # trained above
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(run.mesh, v.ndim))
        for k, v in loop.model_batch(b, cached=False).items()
    }
    lowered = run.train_step.lower(run.abstract_state, abstract_frozen, batch)
    assert lowered.out_info[1]["loss"].shape == (), hw
