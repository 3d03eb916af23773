"""Sources and the Grain pipeline: shapes/dtypes, slicing, mixing, exact resume, bad images, captions, cache mode."""

import json

import numpy as np
import pytest
from array_record.python import array_record_module as ar

from helpers import assert_batches_equal, take
from helpers import word_lengths as tokenize
from iomm_jax.data import data_config, pipeline, records, shapes, sources

RES, VIT, T = 16, 14, 6


def cfg(**kw):
  base = dict(
      source="shapes",
      path="",
      num_images=24,
      resolution=RES,
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
  )
  base.update(kw)
  return data_config.from_config(**base)


def write_pngs(folder, n, captions=True, res=20):
  """n shapes PNGs in folder (sorted names), sidecar captions for the even ones, captions.jsonl for the odd."""
  folder.mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(n):
    png, cap = shapes.render_png(i, res, 0)
    (folder / f"{i:03d}.png").write_bytes(png)
    if captions and i % 2 == 0:
      (folder / f"{i:03d}.txt").write_text(cap)
    elif captions:
      lines.append(json.dumps({"file": f"{i:03d}.png", "caption": cap}))
  if lines:
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------------ sources
def test_folder_source_recursive_with_captions(tmp_path):
  write_pngs(tmp_path / "a", 4)
  write_pngs(tmp_path / "a" / "sub", 2, captions=False)
  (tmp_path / "a" / "notes.md").write_text("not an image")
  src = sources.FolderSource(tmp_path / "a")
  assert len(src) == 6 and src.ids[-1] == "sub/001.png"
  assert src[0]["caption"] == shapes.render(0, 20, 0)[1]  # sidecar
  assert src[1]["caption"] == shapes.render(1, 20, 0)[1]  # captions.jsonl
  assert src[5]["caption"] is None and src[5]["image_bytes"][:4] == b"\x89PNG"


def test_folder_source_errors_name_the_path_and_the_fix(tmp_path):
  with pytest.raises(ValueError, match=rf"{tmp_path / 'nope'}.*does not exist.*data.path"):
    sources.FolderSource(tmp_path / "nope")
  (tmp_path / "empty" / "deeper").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"empty contains no images.*point data.path"):
    sources.FolderSource(tmp_path / "empty")
  with pytest.raises(ValueError, match="data.source"):
    sources.make_source(cfg(source="bogus"))


def test_a_source_that_cannot_be_opened_names_its_config_field(tmp_path):
  """Every app reports DataConfigError in one line; the field is the one the path came from."""
  from array_record.python import array_record_module as ar

  (tmp_path / "shards").mkdir()
  ar.ArrayRecordWriter(str(tmp_path / "shards" / "a.array_record"), "group_size:1").close()
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "a.array_record").write_bytes(b"not a shard")
  (tmp_path / "bad.jsonl").write_text(json.dumps({"img": "x.png"}) + "\n")
  cases = [
      (dict(source="folder", path=str(tmp_path / "nope")), None, r"does not exist; set data.path "),
      (dict(source="folder", path=str(tmp_path / "nope")), "data.val_path", r"does not exist; set data.val_path "),
      (dict(source="jsonl", path=str(tmp_path / "nope.jsonl")), None, r"does not exist; set data.path "),
      (dict(source="jsonl", path=str(tmp_path / "bad.jsonl")), None, r"^config.data.path='.*bad.jsonl': .*'image'"),
      (dict(source="arrayrecord", path=str(tmp_path / "shards")), None, r"hold no records; .*point data.path"),
      (dict(source="arrayrecord", path=str(tmp_path / "junk")), None, r"cannot be read .*point data.path"),
      (
          dict(source="arrayrecord", path=str(tmp_path)),
          "data.image_path",
          r"no ArrayRecord shards .*fix data.image_path",
      ),
      (dict(cached=True, cache_path=str(tmp_path / "nope")), None, r"no ArrayRecord shards .*fix data.cache_path"),
  ]
  for kw, field, want in cases:
    with pytest.raises(pipeline.DataConfigError, match=want):
      sources.make_source(cfg(**kw), field=field)
  assert issubclass(pipeline.DataConfigError, ValueError)


def test_table_sources(tmp_path):
  write_pngs(tmp_path / "img", 3, captions=False)
  (tmp_path / "t.jsonl").write_text(
      "".join(json.dumps({"image": f"img/{i:03d}.png", "caption": f"c{i}"}) + "\n" for i in range(3))
  )
  (tmp_path / "t.csv").write_text("image,caption\n" + "".join(f"img/{i:03d}.png,c{i}\n" for i in range(3)))
  for kind in ("jsonl", "csv"):
    src = sources.make_source(cfg(source=kind, path=str(tmp_path / f"t.{kind}")))
    assert len(src) == 3 and src[2]["caption"] == "c2" and src[2]["image_bytes"][:4] == b"\x89PNG"
  (tmp_path / "bad.jsonl").write_text(json.dumps({"img": "x.png"}) + "\n")
  with pytest.raises(ValueError, match="no 'image' column"):
    sources.JsonlSource(tmp_path / "bad.jsonl")


def test_shapes_source_with_path_writes_into_workdir(tmp_path):
  src = sources.make_source(cfg(path="shapes_data", num_images=5), workdir=tmp_path)
  assert isinstance(src, sources.FolderSource) and len(src) == 5
  assert (tmp_path / "shapes_data" / "captions.jsonl").exists()
  assert src[2]["caption"] == shapes.render(2, RES, 0)[1]


def test_records_round_trip():
  blob = records.encode_feature_record(
      id="x",
      vit_tokens=np.arange(6, dtype=np.float16).reshape(2, 3),
      latent=np.ones((2, 2, 4), np.float32),
      caption_ids=[3, 4],
      caption="hi",
  )
  rec = records.decode_record(blob)
  assert rec["kind"] == "features" and rec["vit_tokens"].dtype == np.float16 and rec["vit_tokens"][1, 2] == 5
  assert rec["caption_ids"].tolist() == [3, 4] and rec["caption"] == "hi"
  img = records.decode_record(records.encode_image_record(image_bytes=b"ab", caption=None, width=3, height=4, id="k"))
  assert img == {"kind": "image", "v": 1, "image_bytes": b"ab", "caption": None, "width": 3, "height": 4, "id": "k"}
  with pytest.raises(ValueError, match="not an iomm_jax record"):
    records.decode_record(b"\x00garbage")


# ----------------------------------------------------------------------------------------------------- pipeline
def test_batch_shapes_dtypes_and_ranges():
  it = iter(pipeline.make_dataset(cfg(recipe="pair"), global_batch=4, tokenize=tokenize))
  b = next(it)
  expect = {
      "pixels": (np.float32, (4, RES, RES, 3)),
      "vit_pixels": (np.float32, (4, VIT, VIT, 3)),
      "caption_ids": (np.int32, (4, T)),
      "caption_len": (np.int32, (4,)),
      "has_caption": (np.bool_, (4,)),
      "is_image_only": (np.bool_, (4,)),
      "skipped": (np.int32, (4,)),
      "skipped_uncaptioned": (np.int32, (4,)),
      "caption_truncated": (np.int32, (4,)),
      "index": (np.int64, (4,)),
  }
  assert set(b) == set(expect)
  for k, (dt, shape) in expect.items():
    assert b[k].dtype == dt and b[k].shape == shape, k
  assert -1 <= b["pixels"].min() < 0 < b["pixels"].max() <= 1
  assert b["pixels"].max() > 0.5  # light backgrounds
  assert -2.2 < b["vit_pixels"].min() and b["vit_pixels"].max() < 2.7  # ImageNet-normalised
  assert b["has_caption"].all() and not b["is_image_only"].any() and (b["skipped"] == 0).all()
  i = int(b["index"][0])
  ids = tokenize(shapes.render(i, RES, 0)[1])[:T]
  assert b["caption_len"][0] == len(ids) and b["caption_ids"][0, : len(ids)].tolist() == ids
  assert (b["caption_ids"][0, len(ids) :] == 0).all()
  ref, _ = shapes.render(i, RES, 0)  # same resolution: pixels are the rendered image, rescaled
  np.testing.assert_allclose(b["pixels"][0], ref / 127.5 - 1, atol=1e-6)


def test_centre_crop_of_a_wide_image():
  from PIL import Image
  from iomm_jax.data import decode

  arr = np.zeros((40, 80, 3), np.uint8)
  arr[:, :20] = 255  # white bands on the left and right outside the centre square
  arr[:, 60:] = 255
  px, vit = decode.views(Image.fromarray(arr), 20, 10)
  assert px.shape == (20, 20, 3) and vit.shape == (10, 10, 3)
  # only the black centre square survives (the outermost columns blend a little, as a resize then crop would)
  np.testing.assert_allclose(px[:, 1:-1], -1.0, atol=1e-6)
  assert px[:, [0, -1]].max() < -0.7


def test_global_batch_must_divide_over_processes():
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_dataset(cfg(), global_batch=6, process_count=4)


def test_two_processes_see_disjoint_halves_of_the_global_batch():
  c = cfg(recipe="mix", mix_lambda=0.5)
  single = take(iter(pipeline.make_dataset(c, global_batch=8)), 3)
  parts = [take(iter(pipeline.make_dataset(c, global_batch=8, process_index=p, process_count=2)), 3) for p in range(2)]
  for k in range(3):
    a, b = parts[0][k], parts[1][k]
    assert a["pixels"].shape[0] == 4
    # each process holds a contiguous block of the global batch: together, in process order, they are exactly
    # the single-process batch (same rows in the same places, so per-row random draws match too)
    np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), single[k]["index"])
    np.testing.assert_array_equal(np.concatenate([a["is_image_only"], b["is_image_only"]]), single[k]["is_image_only"])
  first = [set(parts[p][0]["index"].tolist()) for p in range(2)]
  assert not first[0] & first[1]  # disjoint records (24 records, the first 8 draws of a permutation)


def test_mix_fraction_matches_lambda_and_recipes():
  load = pipeline.LoadExample(sources.ShapesSource(4, RES), cfg(recipe="mix", mix_lambda=0.3))
  draws = np.array([load.image_only(p) for p in range(8000)])
  assert abs(draws.mean() - 0.3) < 0.02  # 4 sigma
  assert draws.tolist() == [load.image_only(p) for p in range(8000)]  # reproducible
  it = iter(pipeline.make_dataset(cfg(recipe="mix", mix_lambda=0.3), global_batch=8))
  frac = np.mean([next(it)["is_image_only"] for _ in range(25)])
  assert abs(frac - 0.3) < 0.1
  assert next(iter(pipeline.make_dataset(cfg(recipe="image"), global_batch=8)))["is_image_only"].all()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_state_round_trip_is_exact(workers):
  c = cfg(recipe="mix", num_workers=workers, num_images=10)
  ds = pipeline.make_dataset(c, global_batch=4, tokenize=tokenize)
  it = iter(ds)
  take(it, 3)  # crosses an epoch boundary (10 records, 12 draws)
  state = it.get_state()
  expected = take(it, 3)
  it.close() if hasattr(it, "close") else None
  it2 = iter(pipeline.make_dataset(c, global_batch=4, tokenize=tokenize))
  it2.set_state(state)
  assert_batches_equal(take(it2, 3), expected)
  it2.close() if hasattr(it2, "close") else None


def _corrupt_folder(tmp_path):
  folder = tmp_path / "bad"
  write_pngs(folder, 60)
  (folder / "005.png").write_bytes(b"")  # zero bytes
  data = (folder / "020.png").read_bytes()
  (folder / "020.png").write_bytes(data[: len(data) // 2])  # truncated
  (folder / "040.png").write_bytes(b"this is not a png at all")  # corrupt
  return folder


def test_five_percent_bad_images_are_skipped_and_counted(tmp_path):
  folder = _corrupt_folder(tmp_path)
  it = iter(pipeline.make_dataset(cfg(source="folder", path=str(folder), recipe="pair"), global_batch=6))
  epoch = take(it, 10)  # 60 draws: exactly one epoch (the shuffle is a permutation of the 60 records)
  idx = np.concatenate([b["index"] for b in epoch])
  skipped = np.concatenate([b["skipped"] for b in epoch])
  assert skipped.sum() == 3
  assert not {5, 20, 40} & set(idx.tolist())
  assert sorted(idx[skipped == 1].tolist()) == [6, 21, 41]  # deterministic substitute: the next record
  assert all(np.isfinite(b["pixels"]).all() for b in epoch)


def test_all_unreadable_fails_with_a_clear_error(tmp_path):
  (tmp_path / "x").mkdir()
  for i in range(3):
    (tmp_path / "x" / f"{i}.jpg").write_bytes(b"")
  with pytest.raises(pipeline.DataConfigError, match=r"3 records in a row .* unusable .*zero-byte.*config.data.path$"):
    pipeline.make_dataset(cfg(source="folder", path=str(tmp_path / "x")), global_batch=2)


def test_pair_recipe_with_uncaptioned_records(tmp_path):
  folder = tmp_path / "f"
  write_pngs(folder, 12, captions=False)
  for i in range(0, 12, 3):
    (folder / f"{i:03d}.txt").write_text(f"caption {i}")
  with pytest.raises(pipeline.DataConfigError, match=r"record '001.png'.*no caption.*skip_uncaptioned"):
    pipeline.make_dataset(cfg(source="folder", path=str(folder), recipe="pair"), global_batch=4)
  # the image recipe does not need captions
  pipeline.make_dataset(cfg(source="folder", path=str(folder), recipe="image"), global_batch=4)
  it = iter(
      pipeline.make_dataset(
          cfg(source="folder", path=str(folder), recipe="pair", skip_uncaptioned=True),
          global_batch=4,
          tokenize=tokenize,
      )
  )
  batches = take(it, 3)
  assert all(b["has_caption"].all() for b in batches)
  assert set(np.concatenate([b["index"] for b in batches]).tolist()) <= {0, 3, 6, 9}
  assert sum(int(b["skipped_uncaptioned"].sum()) for b in batches) > 0
  assert sum(int(b["skipped"].sum()) for b in batches) == 0


def test_cached_feature_mode(tmp_path):
  path = tmp_path / "cache" / "data-00000-of-00001.array_record"
  path.parent.mkdir()
  w = ar.ArrayRecordWriter(str(path), "group_size:1")
  for i in range(6):
    w.write(
        records.encode_feature_record(
            id=str(i),
            vit_tokens=np.full((5, 8), i, np.float16),
            latent=np.full((4, 4, 3), i, np.float32),
            caption_ids=np.arange(i + 1),
            caption=f"c{i}",
        )
    )
  w.close()
  c = cfg(cached=True, cache_path=str(path.parent), recipe="mix")
  b = next(iter(pipeline.make_dataset(c, global_batch=4)))
  assert b["vit_tokens"].shape == (4, 5, 8) and b["vit_tokens"].dtype == np.float16
  assert b["latent"].shape == (4, 4, 4, 3) and "pixels" not in b
  i = b["index"]
  np.testing.assert_array_equal(b["latent"][:, 0, 0, 0], i)
  np.testing.assert_array_equal(b["caption_len"], np.minimum(i + 1, T))
  assert b["caption_ids"][0, : b["caption_len"][0]].tolist() == list(range(b["caption_len"][0]))
  with pytest.raises(pipeline.DataConfigError, match="set data.cached=True"):
    pipeline.make_dataset(cfg(source="arrayrecord", path=str(path.parent)), global_batch=2)


def test_truncated_captions_are_flagged():
  """A caption longer than max_text_tokens is cut and flagged (summed into captions_truncated_total)."""
  long_tokenize = lambda text: list(range(1, 3 * T + 1))  # noqa: E731  longer than T whatever the caption
  b = next(iter(pipeline.make_dataset(cfg(recipe="pair"), global_batch=4, tokenize=long_tokenize)))
  assert (b["caption_truncated"] == 1).all() and (b["caption_len"] == T).all()
  short_tokenize = lambda text: [1, 2]  # noqa: E731
  b = next(iter(pipeline.make_dataset(cfg(recipe="pair"), global_batch=4, tokenize=short_tokenize)))
  assert (b["caption_truncated"] == 0).all()
  b = next(iter(pipeline.make_dataset(cfg(recipe="image"), global_batch=4, tokenize=long_tokenize)))
  assert (b["caption_truncated"] == 0).all()  # image-only samples use no caption
