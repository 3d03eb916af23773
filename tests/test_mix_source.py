"""The image half of the 'mix' recipe from its own set (data.image_source): λ share, each sample from the right set,
each set walked in order, worker/process independence, exact resume, skips counted, cached mode, config errors."""

import numpy as np
import pytest
from array_record.python import array_record_module as ar
from PIL import Image

from helpers import copy_folder, take, tiny_config
from helpers import word_lengths as tokenize
from iomm_jax import config as config_lib
from iomm_jax import config_validation
from iomm_jax.data import data_config, mix, pipeline, records, shapes

RES, VIT, T = 16, 14, 6
N_PAIR, N_IMG = 24, 20


def colour(i):
  """The solid colour of image-set image i: distinct per index."""
  return np.array([(37 * i + 11) % 256, (91 * i + 200) % 256, 60], np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """N_IMG solid-colour, uncaptioned, non-square PNGs: nothing like the shapes pair set."""
  folder = tmp_path_factory.mktemp("img_set")
  for i in range(N_IMG):
    Image.fromarray(np.broadcast_to(colour(i), (20, 28, 3)).copy()).save(folder / f"{i:03d}.png")
  return folder


def cfg(image_folder, **kw):
  base = dict(
      source="shapes",
      path="",
      num_images=N_PAIR,
      resolution=RES,
      vit_size=VIT,
      recipe="mix",
      mix_lambda=0.5,
      num_workers=0,
      seed=0,
      max_text_tokens=T,
      skip_uncaptioned=False,
      cached=False,
      cache_path="",
      prefetch_buffer=2,
      image_source="folder",
      image_path=str(image_folder),
      image_cache_path="",
  )
  base.update(kw)
  return data_config.from_config(**base)


def cat(batches, key):
  return np.concatenate([b[key] for b in batches])


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------------------------- the draws
class SmallDraws(mix.SeededDraws):
  BLOCK, GROUP = 64, 4  # many blocks and groups within a few thousand positions


def test_seeded_draws_counts_are_exact_and_lambda_holds():
  d = SmallDraws((0.7, 0.3), seed=3, tag=1)
  labels = np.array([d.label(k) for k in range(3000)])
  assert abs(labels.mean() - 0.3) < 4 * np.sqrt(0.21 / 3000)
  running = np.concatenate([[0], np.cumsum(labels)])
  fresh = SmallDraws((0.7, 0.3), seed=3, tag=1)
  for k in (0, 1, 63, 64, 255, 256, 257, 1999, 2999, 1000, 5):  # random access, out of order, fresh caches
    assert fresh.count_before(k).tolist() == [k - running[k], running[k]], k
  import pickle

  again = pickle.loads(pickle.dumps(d))  # workers get a copy: same draws
  assert [again.label(k) for k in range(3000)] == labels.tolist()
  assert [SmallDraws((0.7, 0.3), seed=4, tag=1).label(k) for k in range(3000)] != labels.tolist()
  big = mix.mix_draws(0, 0.3)  # the real block size: the λ share over several blocks
  share = big.count_before(100_000)[1] / 100_000
  assert abs(share - 0.3) < 4 * np.sqrt(0.21 / 100_000)


# --------------------------------------------------------------------------------------------- the pipeline
def test_each_sample_comes_from_the_right_set_and_lambda_holds(image_folder):
  lam = 0.25
  it = iter(pipeline.make_dataset(cfg(image_folder, mix_lambda=lam), global_batch=8, tokenize=tokenize))
  batches = take(it, 30)
  img, src = cat(batches, "is_image_only"), cat(batches, "from_image_set")
  np.testing.assert_array_equal(img, src)  # image-only ⇔ read from the image set
  assert abs(img.mean() - lam) < 4 * np.sqrt(lam * (1 - lam) / img.size)
  for b in batches:
    for row in range(8):
      i, px = int(b["index"][row]), b["pixels"][row]
      if b["from_image_set"][row]:  # a solid colour: the image-set image at `index`
        np.testing.assert_allclose(px, np.broadcast_to(colour(i) / 127.5 - 1, px.shape), atol=2 / 127.5)
      else:  # a shapes scene with its caption: the pair-set record at `index`
        np.testing.assert_allclose(px, shapes.render(i, RES, 0)[0] / 127.5 - 1, atol=1e-6)
        ids = tokenize(shapes.render(i, RES, 0)[1])[:T]
        assert b["has_caption"][row] and b["caption_ids"][row, : len(ids)].tolist() == ids


def test_each_set_is_walked_in_order_not_redrawn(image_folder):
  """The first N image-only samples are the N image-set images once each (and likewise for pairs)."""
  it = iter(pipeline.make_dataset(cfg(image_folder), global_batch=8))
  batches = take(it, 12)  # 96 samples: about 48 of each kind, more than one epoch of each set
  idx, src = cat(batches, "index"), cat(batches, "from_image_set")
  image_idx, pair_idx = idx[src], idx[~src]
  assert len(image_idx) >= N_IMG and len(pair_idx) >= N_PAIR
  assert sorted(image_idx[:N_IMG].tolist()) == list(range(N_IMG))
  assert sorted(pair_idx[:N_PAIR].tolist()) == list(range(N_PAIR))
  assert image_idx[:N_IMG].tolist() != list(range(N_IMG))  # shuffled, not in file order


@pytest.mark.slow
def test_same_batches_for_workers_and_processes(image_folder):
  c = cfg(image_folder)
  ref = take(iter(pipeline.make_dataset(c, global_batch=8, tokenize=tokenize)), 4)
  with_workers = iter(pipeline.make_dataset(cfg(image_folder, num_workers=2), global_batch=8, tokenize=tokenize))
  assert_batches_equal(take(with_workers, 4), ref)
  parts = [
      take(iter(pipeline.make_dataset(c, global_batch=8, process_index=p, process_count=2, tokenize=tokenize)), 4)
      for p in range(2)
  ]
  joined = [{k: np.concatenate([parts[0][n][k], parts[1][n][k]]) for k in ref[n]} for n in range(4)]
  assert_batches_equal(joined, ref)


def test_resume_from_iterator_state_is_exact(image_folder):
  c = cfg(image_folder)
  it = iter(pipeline.make_dataset(c, global_batch=8, tokenize=tokenize))
  take(it, 5)  # past one epoch of the image set
  state = it.get_state()
  expected = take(it, 3)
  it2 = iter(pipeline.make_dataset(c, global_batch=8, tokenize=tokenize))
  it2.set_state(state)
  assert_batches_equal(take(it2, 3), expected)


def test_unreadable_image_set_records_are_skipped_and_counted(image_folder, tmp_path):
  folder = copy_folder(image_folder, tmp_path / "imgs")
  (folder / "004.png").write_bytes(b"")
  (folder / "013.png").write_bytes(b"not a png")
  it = iter(pipeline.make_dataset(cfg(folder), global_batch=8))
  batches = take(it, 12)
  src, idx, skipped = cat(batches, "from_image_set"), cat(batches, "index"), cat(batches, "skipped")
  first_epoch = slice(0, np.flatnonzero(src)[N_IMG - 1] + 1)  # the first N_IMG image-set draws
  s, i, k = src[first_epoch], idx[first_epoch], skipped[first_epoch]
  assert k[s].sum() == 2 and k[~s].sum() == 0  # both bad files drawn once, counted, in image-set slots
  assert sorted(i[s & (k == 1)].tolist()) == [5, 14]  # replaced by the next image of the same set
  assert not {4, 13} & set(idx[src].tolist())
  px = np.concatenate([b["pixels"] for b in batches])
  for row in np.flatnonzero(src & (skipped == 1)):  # the substitute really is that image-set image
    np.testing.assert_allclose(
        px[row], np.broadcast_to(colour(int(idx[row])) / 127.5 - 1, px[row].shape), atol=2 / 127.5
    )


def _feature_cache(path, n, value_sign, captions):
  path.mkdir()
  w = ar.ArrayRecordWriter(str(path / "features-00000-of-00001-00000-of-00001.array_record"), "group_size:1")
  for i in range(n):
    w.write(
        records.encode_feature_record(
            id=f"r{i}",
            vit_tokens=np.full((3, 4), value_sign * (i + 1), np.float16),
            latent=np.full((2, 2, 3), value_sign * (i + 1), np.float16),
            caption_ids=np.arange(3) + 1 if captions else None,
            caption=f"c{i}" if captions else None,
        )
    )
  w.close()
  return path


def test_cached_mix_with_its_own_image_cache(tmp_path):
  pair = _feature_cache(tmp_path / "pair", 16, +1, captions=True)
  image = _feature_cache(tmp_path / "image", 12, -1, captions=False)  # an image-only cache has no captions
  c = cfg(
      "",
      source="arrayrecord",
      cached=True,
      cache_path=str(pair),
      image_source="arrayrecord",
      image_path="",
      image_cache_path=str(image),
  )
  batches = take(iter(pipeline.make_dataset(c, global_batch=8)), 6)
  src, idx, lat = cat(batches, "from_image_set"), cat(batches, "index"), cat(batches, "latent")[:, 0, 0, 0]
  np.testing.assert_array_equal(src, cat(batches, "is_image_only"))
  assert 0 < src.mean() < 1
  np.testing.assert_array_equal(lat[src], -(idx[src] + 1))  # image-only rows: the image cache
  np.testing.assert_array_equal(lat[~src], idx[~src] + 1)  # pair rows: the pair cache, with captions
  assert cat(batches, "has_caption")[~src].all()
  bad = _feature_cache(tmp_path / "bad", 4, -1, captions=False)
  blob = records.encode_feature_record(
      id="x", vit_tokens=np.zeros((3, 4), np.float16), latent=np.zeros((4, 4, 3), np.float16)
  )
  w = ar.ArrayRecordWriter(str(bad / "features-00000-of-00001-00000-of-00001.array_record"), "group_size:1")
  w.write(blob)
  w.close()
  with pytest.raises(pipeline.DataConfigError, match=r"data.image_cache_path=.*latent of shape \(4, 4, 3\)"):
    pipeline.make_dataset(
        cfg(
            "",
            source="arrayrecord",
            cached=True,
            cache_path=str(pair),
            image_source="arrayrecord",
            image_path="",
            image_cache_path=str(bad),
        ),
        global_batch=8,
    )


def test_bad_image_source_settings_name_the_field(image_folder):
  # the data config (built by the schema's own check, as make_dataset builds it) names the field
  with pytest.raises(config_lib.ConfigError, match=r"config.data.image_source='imgs' is not one of"):
    cfg(image_folder, image_source="imgs")
  with pytest.raises(config_lib.ConfigError, match=r"data.image_source='folder'.*recipe 'mix'.*data.recipe='pair'"):
    cfg(image_folder, recipe="pair")
  with pytest.raises(config_lib.ConfigError, match=r"data.image_path is empty but .*image_source='folder' needs"):
    cfg(image_folder, image_path="")
  with pytest.raises(config_lib.ConfigError, match=r"data.image_path=.* is set but config.data.image_source is ''"):
    cfg(image_folder, image_source="")
  # the config schema: validate() names the field too
  c = tiny_config("finetune", data__image_source="imgs")
  with pytest.raises(config_lib.ConfigError, match=r"config.data.image_source='imgs' is not one of"):
    config_validation.validate(c)
  c = tiny_config("finetune_image", data__image_source="folder", data__image_path=str(image_folder))
  with pytest.raises(config_lib.ConfigError, match=r"config.data.image_source='folder'.*recipe 'mix'"):
    config_validation.validate(c)
  c = tiny_config("finetune", data__image_source="arrayrecord")
  with pytest.raises(config_lib.ConfigError, match=r"config.data.image_path is empty"):
    config_validation.validate(c)
  c = tiny_config(
      "finetune", data__image_source="arrayrecord", data__image_path="x", data__cached=True, data__cache_path="y"
  )
  with pytest.raises(config_lib.ConfigError, match=r"config.data.image_cache_path"):
    config_validation.validate(c)
  config_validation.validate(tiny_config("finetune", data__image_source="folder", data__image_path=str(image_folder)))
