"""Images decoded right (issue 14 item 5) through the one preparation path: EXIF orientation, 16-bit grey, LA / P /
RGBA transparency on white, CMYK, the pixel limit, truncated JPEGs in prepare, Parquet image bytes and structs, a
prepare that writes nothing, and sample's reference images."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from iomm_jax import sample
from iomm_jax.data import data_config, decode, pipeline, prepare, prepare_items, shapes, sources


def png(im: Image.Image, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format="PNG", **kw)
  return buf.getvalue()


def jpeg(im: Image.Image, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=95, **kw)
  return buf.getvalue()


def decoded(data: bytes, **kw) -> np.ndarray:
  return np.asarray(decode.open_image(data, **kw))


# ------------------------------------------------------------------------------------------------- modes
def test_sixteen_bit_grey_is_scaled_not_clipped():
  ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
  out = decoded(png(Image.fromarray(ramp)))  # PIL writes a 16-bit grey PNG (mode I;16)
  assert out.shape == (48, 64, 3) and out.dtype == np.uint8
  np.testing.assert_allclose(out[..., 0], ramp / 257.0, atol=0.51)  # 8-bit of each 16-bit value, not 255 everywhere
  assert abs(out.mean() - ramp.mean() / 257) < 0.5
  for mode, raw in (("I;16B", ramp.astype(">u2").tobytes()), ("I", ramp.astype(np.int32).tobytes())):
    im = Image.frombytes(mode, (64, 48), raw)
    np.testing.assert_allclose(np.asarray(decode.to_rgb_mode(im))[..., 1], ramp / 257.0, atol=0.51, err_msg=mode)


def test_float_grey_tiff_in_unit_range_is_not_black():
  ramp = np.linspace(0.0, 1.0, 64 * 48, dtype=np.float32).reshape(48, 64)
  buf = io.BytesIO()
  Image.fromarray(ramp, "F").save(buf, format="TIFF")  # a scientific float TIFF in [0, 1]
  out = decoded(buf.getvalue())
  np.testing.assert_allclose(out[..., 0], ramp * 255.0, atol=0.51)  # PIL alone clips to 0–1 of 255: black
  wide = Image.fromarray(ramp * 200.0 + 10.0, "F")  # samples past 1 are read as 0–255 values
  np.testing.assert_allclose(np.asarray(decode.to_rgb_mode(wide))[..., 2], ramp * 200.0 + 10.0, atol=0.51)


def test_transparency_becomes_white():
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, 4:, 3] = 255  # left half fully transparent, right half opaque red-ish
  out = decoded(png(Image.fromarray(rgba, "RGBA")))
  assert (out[:, :4] == 255).all() and (out[:, 4:] == (200, 0, 0)).all()
  la = np.stack(
      [np.full((8, 8), 40, np.uint8), np.where(np.arange(8) < 4, 0, 255).astype(np.uint8)[None].repeat(8, 0)], -1
  )
  out = decoded(png(Image.fromarray(la, "LA")))
  assert (out[:, :4] == 255).all() and (out[:, 4:] == 40).all()
  p = Image.new("P", (8, 8), 1)
  p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
  p.paste(0, (0, 0, 4, 8))  # index 0 is the transparent one
  out = decoded(png(p, transparency=0))
  assert (out[:, :4] == 255).all() and (out[:, 4:] == (10, 20, 30)).all()


def test_cmyk_jpeg_converts_to_the_right_colours():
  cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
  cmyk.paste((0, 0, 0, 255), (8, 0, 16, 16))  # full black
  out = decoded(jpeg(cmyk)).astype(int)
  assert np.abs(out[4, 2] - (255, 0, 0)).max() <= 12 and np.abs(out[4, 13] - (0, 0, 0)).max() <= 12


def test_exif_orientation_is_applied_everywhere():
  arr = np.zeros((20, 40, 3), np.uint8)
  arr[:, :20] = (255, 0, 0)
  arr[:, 20:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6  # displayed rotated 90° clockwise
  data = png(Image.fromarray(arr), exif=exif.tobytes())
  want = np.rot90(arr, k=-1)  # 40 tall, 20 wide: red on top
  np.testing.assert_array_equal(decoded(data), want)
  assert decode.header_size(data) == (20, 40)  # buckets and prepare's recorded sizes see it upright too
  assert prepare.probe_image(data) == (20, 40) and prepare.probe_image(data, full_decode=False) == (20, 40)
  px, _ = decode.views(decode.open_image(data), 8, 8, width=4)  # a tall crop of the upright image
  assert (px[:3, :, 0] > 0.9).all() and (px[-3:, :, 2] > 0.9).all()
  for orientation in range(1, 9):  # 5–8 turn the picture a quarter (mirrored or not): the header size agrees
    exif[0x0112] = orientation
    data = png(Image.fromarray(arr), exif=exif.tobytes())
    assert decode.header_size(data) == decode.open_image(data).size == ((20, 40) if orientation >= 5 else (40, 20))


# ------------------------------------------------------------------------------------------- pixel limit
def test_pixel_limit_skips_and_counts(tmp_path):
  big = png(Image.new("RGB", (120, 100), (9, 9, 9)))
  with pytest.raises(decode.ImageTooLarge, match="max_image_pixels=10000"):
    decode.open_image(big, max_pixels=100 * 100)
  assert decoded(big, max_pixels=0).shape == (100, 120, 3)  # 0 = no limit
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i in range(4):
    (folder / f"{i}.png").write_bytes(shapes.render_png(i, 40, 0)[0])
  (folder / "1.png").write_bytes(big)  # record 1 is too large and is replaced by the next one
  c = data_config.from_config(
      source="folder", path=str(folder), resolution=16, vit_size=16, max_image_pixels=2000, seed=0
  )
  load = pipeline.LoadExample(sources.make_source(c), c)
  out = load((0, 1))
  assert out["skipped"] == 1 and out["index"] == 2
  s = prepare.write_shards(
      prepare_items.enumerate_items(str(folder)), tmp_path / "out", 1, min_size=0, progress=False, max_pixels=2000
  )
  assert (s["written"], s["skipped_too_large"], s["skipped_unreadable"]) == (3, 1, 0)


def test_images_under_the_minimum_side_are_skipped_and_counted_undecoded(tmp_path, monkeypatch):
  icon = png(Image.new("RGB", (12, 90), (9, 9, 9)))  # the short side decides, whichever it is
  with pytest.raises(decode.ImageTooSmall, match="12x90: its short side is under data.min_image_side=16"):
    decode.open_image(icon, min_side=16)
  assert decoded(icon).shape == (90, 12, 3)  # 0 (the default) keeps every size
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i in range(4):
    (folder / f"{i}.png").write_bytes(shapes.render_png(i, 40, 0)[0])
  (folder / "1.png").write_bytes(icon)
  c = data_config.from_config(source="folder", path=str(folder), resolution=16, vit_size=16, min_image_side=16, seed=0)
  load = pipeline.LoadExample(sources.make_source(c), c)
  real_load = ImageFile.ImageFile.load
  decoded_sizes = []
  monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded_sizes.append(im.size) or real_load(im))
  out = load((0, 1))
  assert out["skipped"] == 1 and out["index"] == 2  # the icon is replaced by the next record, and counted
  assert (40, 40) in decoded_sizes and (12, 90) not in decoded_sizes  # the icon was refused from its header
  keep_all = data_config.from_config(source="folder", path=str(folder), resolution=16, vit_size=16, seed=0)
  assert pipeline.LoadExample(sources.make_source(keep_all), keep_all)((0, 1))["skipped"] == 0


def test_unreadable_records_are_named_once_then_only_counted(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(pipeline, "_named_skips", set())
  folder = tmp_path / "imgs"
  folder.mkdir()
  n_bad = pipeline.MAX_NAMED_SKIPS + 2
  for i in range(n_bad + 1):  # bad_00 … bad_11 unreadable, then one good image
    name = f"bad_{i:02d}.png" if i < n_bad else "good.png"
    (folder / name).write_bytes(b"not an image" if i < n_bad else shapes.render_png(0, 40, 0)[0])
  c = data_config.from_config(source="folder", path=str(folder), resolution=16, vit_size=16, seed=0)
  load = pipeline.LoadExample(sources.make_source(c), c)
  assert load((0, n_bad - 3))["skipped"] == 3  # bad_09 … bad_11 named
  assert load((1, n_bad - 3))["skipped"] == 3  # drawn again: counted again, not named again
  assert load((2, 0))["skipped"] == n_bad  # bad_00 … bad_06 named, then one line for the rest
  lines = capsys.readouterr().err.splitlines()
  named = [f"bad_{i:02d}.png" for i in [9, 10, 11, *range(pipeline.MAX_NAMED_SKIPS - 3)]]
  assert [ln.split("'")[1] for ln in lines[:-1]] == named, lines
  assert all(f" of {folder} (UnreadableImage: " in ln and "skipped_total" in ln for ln in lines[:-1])
  assert "not an image format PIL reads (starts b'not an i')" in lines[0] and "BytesIO" not in lines[0], lines[0]
  assert "counted in skipped_total" in lines[-1] and "not named" in lines[-1] and len(lines) == len(named) + 1


# ------------------------------------------------------------------------------------------------ prepare
def test_prepare_fully_decodes_so_a_truncated_jpeg_is_skipped(tmp_path, capsys):
  folder = tmp_path / "imgs"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(4):
    (folder / f"{i}.jpg").write_bytes(jpeg(Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))))
  good = (folder / "0.jpg").read_bytes()
  (folder / "9.jpg").write_bytes(good[: len(good) * 2 // 3])  # cut mid-scan: verify() accepts it, a decode does not
  with pytest.raises(decode.UnreadableImage):
    decode.open_image((folder / "9.jpg").read_bytes())
  assert prepare.main(["--src", str(folder), "--dst", str(tmp_path / "full"), "--shards", "1", "--no_progress"]) == 0
  s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (s["written"], s["skipped_unreadable"]) == (4, 1) and "9.jpg" in s["first_errors"][0]


def test_prepare_that_writes_nothing_exits_nonzero_with_the_reason(tmp_path, capsys):
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i in range(3):
    (folder / f"{i}.png").write_bytes(shapes.render_png(i, 32, 0)[0])
  rc = prepare.main(
      ["--src", str(folder), "--dst", str(tmp_path / "out"), "--shards", "1", "--no_progress", "--min_size", "64"]
  )
  err = capsys.readouterr().err
  assert rc == 1 and "wrote 0 of 3 images (3 too small)" in err and "--min_size" in err


# ------------------------------------------------------------------------------------------------- parquet
def _parquet(path, images, captions, kind):
  if kind == "bytes":
    col = pa.array(images, pa.binary())
  else:  # HF datasets' Image feature: {bytes, path}; a struct may hold only a path (relative to the table)
    col = pa.array(
        [{"bytes": b, "path": p} for b, p in images], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
  pq.write_table(pa.table({"image": col, "caption": captions}), path, row_group_size=3)


@pytest.mark.parametrize("kind", ["bytes", "struct"])
def test_parquet_image_bytes_and_structs_are_read(tmp_path, kind):
  pngs = [shapes.render_png(i, 24, 0) for i in range(7)]
  captions = [c for _, c in pngs]
  if kind == "bytes":
    images = [b for b, _ in pngs]
  else:
    (tmp_path / "six.png").write_bytes(pngs[6][0])
    images = [(b, f"ignored{i}.png") for i, (b, _) in enumerate(pngs[:6])] + [(None, "six.png")]
  _parquet(tmp_path / "t.parquet", images, captions, kind)
  src = sources.make_source(data_config.from_config(source="parquet", path=str(tmp_path / "t.parquet")))
  assert len(src) == 7 and src.caption(4) == captions[4]
  for i in (0, 4, 6, 2):  # across row groups of 3, and back
    assert src[i]["image_bytes"] == pngs[i][0] and src[i]["caption"] == captions[i]
  s = prepare.write_shards(
      prepare_items.enumerate_items(str(tmp_path / "t.parquet")), tmp_path / "out", 2, min_size=0, progress=False
  )
  assert s["written"] == 7
  recs = sources.ArrayRecordSource(tmp_path / "out")
  assert sorted(recs[i]["image_bytes"] for i in range(7)) == sorted(b for b, _ in pngs)


# -------------------------------------------------------------------------------------------------- sample
def test_sample_reference_image_goes_through_the_training_path(tmp_path):
  rgba = np.zeros((30, 50, 4), np.uint8)  # fully transparent: must come out white, as training sees it
  (tmp_path / "ref.png").write_bytes(png(Image.fromarray(rgba, "RGBA")))
  c = data_config.from_config(source="shapes", resolution=16, vit_size=12)
  px, vit = sample.load_image_views(str(tmp_path / "ref.png"), c)
  np.testing.assert_allclose(px, 1.0)
  np.testing.assert_allclose(vit, decode.vit_normalize(np.full((12, 12, 3), 255, np.uint8)), atol=1e-6)
  (tmp_path / "bad.png").write_bytes(b"not an image")
  with pytest.raises(SystemExit, match="cannot be read as an image"):
    sample.load_image_views(str(tmp_path / "bad.png"), c)
