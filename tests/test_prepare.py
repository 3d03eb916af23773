"""prepare: folder / table / tar / TFDS → ArrayRecord → pipeline; counts, resumability, no half-written shards."""

import errno
import functools
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from iomm_jax.data import data_config, holdout, pipeline, prepare, prepare_items, prepare_plan, records, shapes, shapes_shards, sources


def cfg(path, **kw):
  base = dict(
      source="arrayrecord",
      path=str(path),
      num_images=0,
      resolution=16,
      vit_size=16,
      recipe="pair",
      mix_lambda=0.5,
      num_workers=0,
      seed=0,
      max_text_tokens=4,
      skip_uncaptioned=False,
      cached=False,
      cache_path="",
      prefetch_buffer=2,
  )
  base.update(kw)
  return data_config.from_config(**base)


def read_all(dst):
  src = sources.ArrayRecordSource(dst)
  return [src[i] for i in range(len(src))]


def jpeg(i, res=72):
  buf = io.BytesIO()
  Image.fromarray(shapes.render(i, res, 0)[0]).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def make_folder(root, n=10):
  """n images with sidecar captions, plus one corrupt, one truncated, one zero-byte and one too small."""
  root.mkdir(parents=True)
  for i in range(n):
    sub = root / ("a" if i % 2 else "b")
    sub.mkdir(exist_ok=True)
    (sub / f"{i:02d}.jpg").write_bytes(jpeg(i))
    (sub / f"{i:02d}.txt").write_text(shapes.render(i, 72, 0)[1])
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  png, _ = shapes.render_png(0, 72, 0)
  (root / "truncated.png").write_bytes(png[: len(png) // 2])
  (root / "empty.webp").write_bytes(b"")
  Image.new("RGB", (40, 80)).save(root / "small.png")
  return root


def test_prepare_from_folder_counts_and_records(tmp_path, capsys):
  src = make_folder(tmp_path / "imgs")
  rc = prepare.main(["--src", str(src), "--dst", str(tmp_path / "out"), "--shards", "3", "--no_progress"])
  assert rc == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (summary["written"], summary["skipped_unreadable"], summary["skipped_too_small"]) == (10, 3, 1)
  assert sorted(p.name for p in (tmp_path / "out").glob("*.array_record")) == [
      f"data-0000{s}-of-00003.array_record" for s in range(3)
  ]
  recs = read_all(tmp_path / "out")
  assert len(recs) == 10
  by_id = {r["id"]: r for r in recs}
  r = by_id[hashlib.sha1(b"a/03.jpg").hexdigest()]  # stable id = sha1 of the relative source path
  assert r["image_bytes"] == (src / "a" / "03.jpg").read_bytes()  # bytes kept as they are
  assert (r["width"], r["height"], r["caption"]) == (72, 72, shapes.render(3, 72, 0)[1])
  b = next(iter(pipeline.make_dataset(cfg(tmp_path / "out"), global_batch=4, tokenize=lambda s: [1] * len(s))))
  assert b["pixels"].shape == (4, 16, 16, 3) and b["has_caption"].all() and (b["caption_len"] == 4).all()


def test_prepare_from_jsonl_and_csv(tmp_path):
  img = tmp_path / "img"
  img.mkdir()
  rows = []
  for i in range(6):
    (img / f"{i}.jpg").write_bytes(jpeg(i))
    rows.append({"path": f"img/{i}.jpg", "text": f"caption {i}"})
  (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "t.csv").write_text("path,text\n" + "".join(f"{r['path']},{r['text']}\n" for r in rows))
  outs = []
  for kind in ("jsonl", "csv"):
    items = prepare_items.enumerate_items(str(tmp_path / f"t.{kind}"), image_key="path", caption_key="text")
    s = prepare.write_shards(items, tmp_path / kind, 2, progress=False)
    assert s["written"] == 6
    outs.append(sorted((r["id"], r["caption"], r["image_bytes"]) for r in read_all(tmp_path / kind)))
  assert outs[0] == outs[1]  # same input through either table format: same records
  assert {o[1] for o in outs[0]} == {f"caption {i}" for i in range(6)}


def test_prepare_from_webdataset_tars(tmp_path):
  for t in range(2):
    with tarfile.open(tmp_path / f"{t:05d}.tar", "w") as tf:
      for i in range(4):
        key = f"{t}{i:03d}"
        for name, data in (
            (f"{key}.jpg", jpeg(t * 4 + i)),
            (f"{key}.txt", f"cap {key}".encode()),
            (f"{key}.json", b"{}"),
        ):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tf.addfile(info, io.BytesIO(data))
  s = prepare.write_shards(prepare_items.enumerate_items(str(tmp_path / "*.tar")), tmp_path / "out", 2, progress=False)
  assert s["written"] == 8 and s["skipped_unreadable"] == 0
  recs = read_all(tmp_path / "out")
  assert {r["caption"] for r in recs} == {f"cap {t}{i:03d}" for t in range(2) for i in range(4)}
  r = next(r for r in recs if r["caption"] == "cap 1002")
  assert r["image_bytes"] == jpeg(6) and r["id"] == hashlib.sha1(b"00001.tar/1002").hexdigest()
  it = iter(pipeline.make_dataset(cfg(tmp_path / "out"), global_batch=8))
  assert sorted(next(it)["index"].tolist()) == list(range(8))  # one epoch: every record once


def test_prepare_from_tfds_builder_dir(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """Encoded images as a bytes Tensor feature: writing tfds.features.Image needs TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
              {"image": tfds.features.Tensor(shape=(), dtype=np.object_), "caption": tfds.features.Text()}
          ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        yield i, {"image": jpeg(i), "caption": f"tfds {i}"}

  builder = TinyShapes(data_dir=str(tmp_path / "tfds"), file_format="array_record")
  builder.download_and_prepare()
  src = sources.TfdsSource(builder.data_dir, "train", "image", "caption")
  assert len(src) == 5 and {src[i]["caption"] for i in range(5)} == {f"tfds {i}" for i in range(5)}
  s = prepare.write_shards(prepare_items.enumerate_items(str(builder.data_dir)), tmp_path / "out", 1, progress=False)
  assert s["written"] == 5
  assert {r["caption"] for r in read_all(tmp_path / "out")} == {f"tfds {i}" for i in range(5)}
  b = next(iter(pipeline.make_dataset(cfg(builder.data_dir, source="tfds", caption_key="caption"), global_batch=5)))
  assert b["has_caption"].all() and b["pixels"].shape == (5, 16, 16, 3)


def test_shapes_to_arrayrecord_and_rerun_skips_finished_shards(tmp_path):
  dst = tmp_path / "ar"
  s1 = shapes_shards.write_arrayrecord(dst, 20, 24, seed=1, shards=4)
  assert (s1["written"], s1["shards_written"]) == (20, 4)
  stamps = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.array_record")}
  s2 = shapes_shards.write_arrayrecord(dst, 20, 24, seed=1, shards=4)
  assert (s2["written"], s2["shards_written"], s2["shards_already_done"]) == (20, 0, 4)
  assert stamps == {p.name: p.stat().st_mtime_ns for p in dst.glob("*.array_record")}
  recs = read_all(dst)
  by_caption = {r["caption"] for r in recs}
  assert by_caption == {shapes.render(i, 24, 1)[1] for i in range(20)}
  with pytest.raises(ValueError, match="other options .the source was"):
    shapes_shards.write_arrayrecord(dst, 21, 24, seed=1, shards=4)
  with pytest.raises(ValueError, match="other options .--shards was 4, now 3"):
    shapes_shards.write_arrayrecord(dst, 20, 24, seed=1, shards=3)


def test_parallel_workers_write_the_same_shards(tmp_path):
  shapes_shards.write_arrayrecord(tmp_path / "w0", 12, 16, shards=3, workers=0)
  shapes_shards.write_arrayrecord(tmp_path / "w2", 12, 16, shards=3, workers=2)
  for name in (f"data-0000{s}-of-00003.array_record" for s in range(3)):
    a = sources.ArrayRecordSource(tmp_path / "w0" / name)
    b = sources.ArrayRecordSource(tmp_path / "w2" / name)
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]


class _Interrupt(BaseException):
  pass


def _dies(i):
  if i == 7:
    raise _Interrupt("simulated Ctrl-C")
  return shapes.render_png(i, 16, 0)


def _good_items():
  return [prepare_items.Item(f"k{i:02d}", functools.partial(shapes.render_png, i, 16, 0)) for i in range(12)]


def test_an_exception_mid_shard_leaves_only_finished_shards(tmp_path):
  dst = tmp_path / "out"
  items = [prepare_items.Item(f"k{i:02d}", functools.partial(_dies, i)) for i in range(12)]
  with pytest.raises(_Interrupt):  # dies inside shard 1 (3 shards of 4 items)
    prepare.write_shards(items, dst, 3, min_size=0, progress=False)
  assert sorted(p.name for p in dst.iterdir()) == [".prepare", "data-00000-of-00003.array_record"]
  with pytest.raises(pipeline.DataConfigError, match="only 1 of the 3 shards"):  # not read as the whole dataset
    sources.ArrayRecordSource(dst)
  assert len(sources.ArrayRecordSource(dst / "data-00000-of-00003.array_record")) == 4  # the shard itself, asked for


@pytest.mark.parametrize("lost", ["shard", "stats", "shard, no plan"])
def test_training_refuses_a_prepared_folder_whose_run_did_not_finish(tmp_path, lost):
  """A prepare stopped by a full disk or a kill keeps its finished shards, for the rerun to resume: data.path (and
  data.val_path) naming that folder is refused in one line with the counts and the rerun, not trained on in part. A
  finished folder, and a folder of shards another tool wrote (no .prepare/), read as before."""
  dst = tmp_path / "out"
  shapes_shards.write_arrayrecord(dst, 12, 16, shards=4, progress=False)
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  for p in dst.glob("*.array_record"):
    shutil.copy(p, foreign / p.name)
  assert len(sources.make_source(cfg(dst))) == len(sources.make_source(cfg(foreign))) == 12
  name = prepare.SHARD_PATTERN.format(2, 4)
  if lost.startswith("shard"):
    (dst / name).unlink()
  else:  # the shard is there, but not its stats file: the rerun takes it as unfinished and writes it again
    (dst / prepare.STATE_DIR / f"{name}.json").unlink()
  if lost.endswith("no plan"):  # a prepare from before plans: the names say how many shards there are
    (dst / prepare.STATE_DIR / prepare_plan.PLAN_FILE).unlink()
  rerun = f"rerun the same `python -m iomm_jax.data.prepare` command (--dst={dst})"
  for make, field in (
      (lambda: sources.make_source(cfg(dst)), "data.path"),
      (lambda: holdout.val_source(cfg(tmp_path / "unused", val_path=str(dst))), "data.val_path"),
      (lambda: pipeline.make_dataset(cfg(dst), global_batch=2), "data.path"),
  ):
    with pytest.raises(pipeline.DataConfigError) as e:
      make()
    msg = str(e.value)
    assert msg.startswith(
        f"config.{field}={str(dst)!r}: only 3 of the 4 shards that prepare planned there are finished"
    )
    assert rerun in msg and "\n" not in msg, msg
  assert len(sources.make_source(cfg(foreign))) == 12  # no .prepare/: read as it is
  prepare.write_shards(_good_items(), tmp_path / "other", 2, min_size=0, progress=False)  # a finished one
  assert len(sources.make_source(cfg(tmp_path / "other"))) == 12


@pytest.mark.parametrize("fails", ["stats", "shard"])
def test_a_failed_commit_leaves_a_shard_only_with_its_stats_and_no_temporary_file(tmp_path, monkeypatch, fails):
  """The stats file is replaced first, then the shard: a failure at either commit never leaves a shard without
  stats (which a rerun would take as finished), leaves no temporary file, and a rerun redoes that shard."""
  dst, lost = tmp_path / "out", "data-00001-of-00003.array_record"
  target = {"stats": f"{lost}.json", "shard": lost}[fails]
  replace = os.replace

  def failing_replace(src, dst_path):
    if os.path.basename(dst_path) == target:
      raise OSError(errno.EIO, "Input/output error")
    replace(src, dst_path)

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(OSError, match="Input/output error"):
    prepare.write_shards(_good_items(), dst, 3, min_size=0, progress=False)
  monkeypatch.undo()
  assert not (dst / lost).exists()
  assert (dst / prepare_plan.STATE_DIR / f"{lost}.json").exists() == (fails == "shard")  # stats committed first
  assert not [p for p in dst.rglob("*") if ".tmp-" in p.name]
  assert sorted(p.name for p in dst.glob("*.array_record")) == ["data-00000-of-00003.array_record"]
  s = prepare.write_shards(_good_items(), dst, 3, min_size=0, progress=False)
  assert (s["shards_written"], s["shards_already_done"], s["written"]) == (2, 1, 12)
  assert len(sources.ArrayRecordSource(dst)) == 12


_KILLED_RUN = """
import functools, os, signal, sys
from iomm_jax.data import prepare, prepare_items, shapes

def load(i):
    if i == 7:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind can run
    return shapes.render_png(i, 16, 0)

items = [prepare_items.Item(f"k{i:02d}", functools.partial(load, i)) for i in range(12)]
prepare.write_shards(items, sys.argv[1], 3, min_size=0, progress=False)
"""


def test_sigkilled_prepare_leaves_no_readable_half_shard_and_resumes(tmp_path):
  dst = tmp_path / "out"
  script = tmp_path / "killed.py"
  script.write_text(_KILLED_RUN)
  proc = subprocess.run([sys.executable, str(script), str(dst)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  leftovers = list(dst.glob(".data-00001-of-00003.array_record.tmp-*"))
  assert len(leftovers) == 1  # the half-written shard exists, under its temporary name only
  assert sorted(p.name for p in dst.glob("*.array_record")) == ["data-00000-of-00003.array_record"]
  with pytest.raises(pipeline.DataConfigError, match="only 1 of the 3 shards"):  # readers refuse the folder
    sources.ArrayRecordSource(dst)
  assert len(sources.ArrayRecordSource(dst / "data-*.array_record")) == 4  # a glob sees only the finished shard
  s = prepare.write_shards(_good_items(), dst, 3, min_size=0, progress=False)
  assert (s["shards_written"], s["shards_already_done"], s["written"]) == (2, 1, 12)
  assert not list(dst.glob(".*.tmp-*"))
  assert len(sources.ArrayRecordSource(dst)) == 12


def test_prepare_errors(tmp_path, capsys):
  assert prepare.main(["--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "o"), "--shards", "1"]) == 2
  assert "does not exist" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  assert prepare.main(["--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "o"), "--shards", "1"]) == 2
  assert "holds no images" in capsys.readouterr().err
  # A table's bad line or row is named: the line of a .jsonl, the row of a .csv as a spreadsheet numbers it.
  (tmp_path / "img.jpg").write_bytes(jpeg(0))
  (tmp_path / "t.jsonl").write_text('{"image": "img.jpg"}\n\nnot json\n')
  assert prepare.main(["--src", str(tmp_path / "t.jsonl"), "--dst", str(tmp_path / "o"), "--shards", "1"]) == 2
  assert "t.jsonl:3: not JSON" in capsys.readouterr().err
  (tmp_path / "t.jsonl").write_text('{"image": "img.jpg"}\n["img.jpg"]\n')
  assert prepare.main(["--src", str(tmp_path / "t.jsonl"), "--dst", str(tmp_path / "o"), "--shards", "1"]) == 2
  assert "t.jsonl:2: a JSON list, not an object" in capsys.readouterr().err
  (tmp_path / "t.csv").write_text("image,caption\nimg.jpg,a\n,b\n")
  assert prepare.main(["--src", str(tmp_path / "t.csv"), "--dst", str(tmp_path / "o"), "--shards", "1"]) == 2
  assert "t.csv: row 3: 'image' is empty" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()
  for bad, message in (
      (["--min_size", "-1"], "--min_size=-1 must be 0 or more"),
      (["--workers", "-2"], "--workers=-2 must be 0 or more"),
  ):
    args = ["--src", str(tmp_path / "t.csv"), "--dst", str(tmp_path / "o"), "--shards", "1", *bad]
    with pytest.raises(SystemExit):
      prepare.main(args)
    assert message in capsys.readouterr().err
  (tmp_path / "t.csv").write_text("image,caption\nimg.jpg,a\n")
  assert prepare.main(["--src", str(tmp_path / "t.csv"), "--dst", str(tmp_path / "img.jpg"), "--shards", "1"]) == 2
  assert "--dst=" + str(tmp_path / "img.jpg") + " exists and is not a folder" in capsys.readouterr().err
  assert (
      records.decode_record(records.encode_image_record(image_bytes=b"x", caption="c", width=1, height=1, id="i"))[
          "caption"
      ]
      == "c"
  )


def _small_folder(root, n=6, side=40):
  root.mkdir()
  for i in range(n):
    Image.new("RGB", (side, side), (i * 30, 0, 0)).save(root / f"{i:02d}.png")
  return root


def test_a_run_that_writes_nothing_leaves_nothing_and_the_corrected_rerun_proceeds(tmp_path, capsys):
  src = _small_folder(tmp_path / "src")
  args = ["--src", str(src), "--dst", str(tmp_path / "out"), "--shards", "2", "--no_progress"]
  assert prepare.main(args) == 1  # every image under the default --min_size 64
  assert "wrote 0 of 6 images (6 too small)" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()  # it made the folder, so it removes it
  (tmp_path / "keep").mkdir()  # a folder it did not make: emptied of what it wrote, and kept
  assert prepare.main([*args[:2], "--dst", str(tmp_path / "keep"), *args[4:]]) == 1
  assert (tmp_path / "keep").is_dir() and not list((tmp_path / "keep").iterdir())
  assert prepare.main([*args, "--min_size", "32"]) == 0
  assert len(sources.ArrayRecordSource(tmp_path / "out")) == 6


def test_empty_shards_of_an_earlier_run_are_replaced_and_other_shards_refused_naming_the_options(tmp_path, capsys):
  src = _small_folder(tmp_path / "src")
  dst = tmp_path / "out"
  items = prepare_items.enumerate_items(str(src))
  # What prepare left before it removed an empty output: two shards holding no record, their stats and the plan.
  (dst / prepare.STATE_DIR).mkdir(parents=True)
  for s in range(2):
    prepare.write_shard(str(dst), prepare.SHARD_PATTERN.format(s, 2), items[3 * s : 3 * s + 3], 64, True)
  plan = prepare_plan.plan_of(items, 2, 64, {"src": str(src)})
  (dst / prepare.STATE_DIR / "plan.json").write_text(json.dumps(plan))
  args = ["--src", str(src), "--dst", str(dst), "--no_progress"]
  assert prepare.main([*args, "--shards", "3", "--min_size", "32"]) == 0
  assert sorted(p.name for p in dst.glob("*.array_record")) == [f"data-0000{s}-of-00003.array_record" for s in range(3)]
  assert len(sources.ArrayRecordSource(dst)) == 6
  capsys.readouterr()
  # Shards that hold records are never replaced: the refusal names each option that differs, old and new.
  assert prepare.main([*args, "--shards", "2", "--min_size", "16"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "{" not in err, err
  assert "--shards was 3, now 2" in err and "--min_size was 32, now 16" in err and "give a new --dst" in err
  assert len(sources.ArrayRecordSource(dst)) == 6
  # The keys read and the pixel limit decide what a shard holds too: a resume with others would mix two datasets.
  assert prepare.main([*args, "--shards", "3", "--min_size", "32", "--caption_key", "", "--max_image_pixels", "9"]) == 2
  err = capsys.readouterr().err.strip()
  assert '--caption_key was "caption", now ""' in err and "--max_image_pixels was" in err and "now 9" in err, err
  assert "--shards" not in err and len(sources.ArrayRecordSource(dst)) == 6


def test_table_errors_name_the_file_and_the_keys_read(tmp_path, capsys):
  (tmp_path / "t.csv").write_bytes(b"image,caption\nimg.jpg,caf\xe9\n")
  assert prepare.main(["--src", str(tmp_path / "t.csv"), "--dst", str(tmp_path / "o"), "--shards", "1"]) == 2
  err = capsys.readouterr().err.strip()
  assert f"{tmp_path / 't.csv'}: not UTF-8 text (byte 0xe9 on line 2)" in err and "\n" not in err
  (tmp_path / "t.jsonl").write_text('{"image": "img.jpg"}\nnot json\n')
  assert prepare.main(["--src", str(tmp_path / "t.jsonl"), "--dst", str(tmp_path / "o"), "--shards", "1"]) == 2
  assert 'such as {"image": "relative/path.png", "caption": "..."}' in capsys.readouterr().err
  args = ["--src", str(tmp_path / "t.jsonl"), "--dst", str(tmp_path / "o"), "--shards", "1", "--image_key", "path"]
  assert prepare.main([*args, "--caption_key", ""]) == 2
  assert 'such as {"path": "relative/path.png"}' in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_a_dst_holding_anything_but_prepares_own_output_or_the_source_is_refused_before_reading(tmp_path, capsys):
  """prepare adds its shards only to a new or empty folder or its own earlier output: a training workdir, another
  tool's shards or the images themselves are refused in one line naming --dst, and stay as they were."""
  src = _small_folder(tmp_path / "src")
  args = ["--shards", "2", "--min_size", "16", "--no_progress"]
  workdir = tmp_path / "workdir"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  cache_out = tmp_path / "features"  # the feature cache's folder: its state folder and shards
  (cache_out / ".cache_state").mkdir(parents=True)
  (cache_out / "features-00000-of-00001-00000-of-00001.array_record").write_bytes(b"x")
  for dst, says in (
      (workdir, f"--dst={workdir} holds 'checkpoints', which prepare did not write"),
      (cache_out, f"--dst={cache_out} holds '.cache_state', which prepare did not write"),
      (src, f"--dst={src} is, holds or lies inside --src={src}"),
      (src / "out", f"--dst={src / 'out'} is, holds or lies inside --src={src}"),
      (tmp_path, f"--dst={tmp_path} is, holds or lies inside --src={src}"),
  ):
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert prepare.main(["--src", str(src), "--dst", str(dst), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prepare: error: {says}") and "\n" not in err, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing written
  with pytest.raises(ValueError, match="holds 'checkpoints'"):  # the API checks it too
    prepare.write_shards(prepare_items.enumerate_items(str(src)), workdir, 1, min_size=16, progress=False)
  # Its own earlier output (a kill's temporary left in it) resumes; so does an empty folder.
  out = tmp_path / "out"
  assert prepare.main(["--src", str(src), "--dst", str(out), *args]) == 0
  (out / prepare.SHARD_PATTERN.format(1, 2)).unlink()
  (out / f".{prepare.SHARD_PATTERN.format(1, 2)}.tmp-dead").write_bytes(b"half")
  capsys.readouterr()
  assert prepare.main(["--src", str(src), "--dst", str(out), *args]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (summary["shards_written"], summary["shards_already_done"], summary["written"]) == (1, 1, 6)
  (tmp_path / "empty").mkdir()
  assert prepare.main(["--src", str(src), "--dst", str(tmp_path / "empty"), *args]) == 0
