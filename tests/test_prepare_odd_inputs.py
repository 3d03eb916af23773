"""Corpora as they arrive from the world, through `prepare` and the training sources: stray encodings, linked
folders, Parquet shards in a folder, compressed or cut-short tars, a caption column under another name, a full disk.
Each either works (counting what it drops) or stops with one line naming the file and what to do."""

import gzip
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from iomm_jax.data import corpus_files, prepare, shapes, sources
from iomm_jax.data.data_config import DataConfigError


def png(i, side=72):
  buf = io.BytesIO()
  Image.fromarray(shapes.render(i, side, 0)[0]).save(buf, format="PNG")
  return buf.getvalue()


def run(capsys, src, dst, *flags):
  rc = prepare.main(["--src", str(src), "--dst", str(dst), "--shards", "1", "--no_progress", *flags])
  out, err = capsys.readouterr()
  return rc, (json.loads(out.strip().splitlines()[-1]) if out.strip() else None), err.strip()


def captions_of(dst):
  src = sources.ArrayRecordSource(dst)
  return sorted(src[i]["caption"] or "" for i in range(len(src)))


def add(tf, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tf.addfile(info, io.BytesIO(data))


def test_a_stray_encoding_keeps_the_image_and_its_caption(tmp_path, capsys):
  folder = tmp_path / "f"
  folder.mkdir()
  (folder / "a.png").write_bytes(png(0))
  (folder / "a.txt").write_bytes(b"caf\xe9 au lait\n")  # latin-1, with the newline an editor adds
  (folder / "b.png").write_bytes(png(1))
  (folder / "b.txt").write_text("a red circle\n")
  rc, summary, _ = run(capsys, folder, tmp_path / "o")
  assert rc == 0 and summary["written"] == 2 and summary["skipped_unreadable"] == 0
  assert summary["written_with_caption"] == 2
  assert captions_of(tmp_path / "o") == ["a red circle", "caf\ufffd au lait"]
  src = sources.FolderSource(folder)  # training reads the sidecar the same way
  assert [src.caption(i) for i in range(2)] == ["caf\ufffd au lait", "a red circle"]
  with tarfile.open(tmp_path / "s.tar", "w") as tf:
    add(tf, "k.png", png(2))
    add(tf, "k.txt", b"\xff\xfe odd")
  rc, summary, _ = run(capsys, tmp_path / "s.tar", tmp_path / "t")
  assert rc == 0 and captions_of(tmp_path / "t") == ["\ufffd\ufffd odd"]


def test_every_format_pil_reads_is_an_image_of_a_folder_and_a_tar(tmp_path, capsys):
  folder = tmp_path / "f"
  folder.mkdir()
  image = Image.fromarray(shapes.render(0, 72, 0)[0])
  for ext in ("bmp", "gif", "tif", "tiff", "png"):
    image.save(folder / f"x.{ext}")
  assert sorted(p.suffix for p, _ in corpus_files.list_images(folder)) == [".bmp", ".gif", ".png", ".tif", ".tiff"]
  rc, summary, _ = run(capsys, folder, tmp_path / "o")
  assert rc == 0 and summary["written"] == 5 and summary["skipped_unreadable"] == 0
  with tarfile.open(tmp_path / "s.tar", "w") as tf:
    add(tf, "k.bmp", (folder / "x.bmp").read_bytes())
  rc, summary, _ = run(capsys, tmp_path / "s.tar", tmp_path / "t")
  assert rc == 0 and summary["written"] == 1


def test_linked_folders_are_read_once(tmp_path, capsys):
  other = tmp_path / "other"
  other.mkdir()
  for i in range(3):
    (other / f"{i}.png").write_bytes(png(i))
  root = tmp_path / "root"
  root.mkdir()
  (root / "top.png").write_bytes(png(5))
  (root / "linked").symlink_to(other)
  (root / "again").symlink_to(other)  # the same folder linked twice
  (other / "loop").symlink_to(root)  # and a link back up: read once, no endless walk
  found = [p.relative_to(root).as_posix() for p, _ in corpus_files.list_images(root)]
  assert len(found) == 4 and "top.png" in found, found
  assert len(sources.FolderSource(root)) == 4


def test_a_folder_or_glob_of_tables_is_one_dataset(tmp_path, capsys):
  pq = pytest.importorskip("pyarrow.parquet")
  pa = pytest.importorskip("pyarrow")
  shards = tmp_path / "hf"
  shards.mkdir()
  for s in range(2):  # Hugging Face's layout: images as {bytes, path} structs
    rows = [{"image": {"bytes": png(2 * s + i), "path": None}, "caption": f"c{s}{i}"} for i in range(2)]
    pq.write_table(pa.Table.from_pylist(rows), shards / f"train-0000{s}-of-00002.parquet")
  rc, summary, err = run(capsys, shards, tmp_path / "o")
  assert rc == 0 and summary["written"] == 4, err
  assert captions_of(tmp_path / "o") == ["c00", "c01", "c10", "c11"]
  rc, summary, _ = run(capsys, shards / "*.parquet", tmp_path / "g")
  assert rc == 0 and captions_of(tmp_path / "g") == ["c00", "c01", "c10", "c11"]
  # Training reads one table file; pointed at the folder it says how to read them all.
  with pytest.raises(DataConfigError, match="is a folder; point it at one table file.*prepare --src DIR"):
    sources.ParquetSource(shards)
  rc, _, err = run(capsys, tmp_path / "*.nothing", tmp_path / "n")
  assert rc == 2 and "the glob must match .tar shards or table files" in err and "\n" not in err


def test_compressed_and_cut_short_tars_are_told_apart(tmp_path, capsys):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tf:
    for i in range(4):
      add(tf, f"{i}.png", png(i))
  whole = buf.getvalue()
  second_header = 512 + -(-len(png(0)) // 512) * 512
  (tmp_path / "cut.tar").write_bytes(whole[: second_header + 100])  # cut inside a member's header
  rc, _, err = run(capsys, tmp_path / "cut.tar", tmp_path / "o")
  assert rc == 2 and "not a whole tar" in err and "cut short" in err and "decompress" not in err, err
  (tmp_path / "cut.tar").write_bytes(whole[: second_header + 1024])  # cut inside a member's data
  rc, _, err = run(capsys, tmp_path / "cut.tar", tmp_path / "o")
  assert rc == 2 and "not a whole tar" in err and "cut short" in err, err
  (tmp_path / "gz.tar").write_bytes(gzip.compress(whole))  # a gzip under a .tar name
  rc, _, err = run(capsys, tmp_path / "gz.tar", tmp_path / "o")
  assert rc == 2 and "a compressed tar; decompress" in err, err
  (tmp_path / "s.tar.gz").write_bytes(gzip.compress(whole))
  rc, _, err = run(capsys, tmp_path / "s.tar.gz", tmp_path / "o")
  assert rc == 2 and "a compressed tar; decompress it first" in err and "table type" not in err, err
  assert not (tmp_path / "o").exists()


def test_an_empty_image_field_and_a_missing_caption_column_are_named(tmp_path, capsys):
  (tmp_path / "a.png").write_bytes(png(0))
  (tmp_path / "t.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"image": null, "caption": "y"}\n')
  rc, _, err = run(capsys, tmp_path / "t.jsonl", tmp_path / "o")
  assert rc == 2 and "t.jsonl: line 2: 'image' is empty" in err and "no 'image' column" not in err, err
  (tmp_path / "t.jsonl").write_text('{"image": "a.png", "text": "a red circle"}\n')
  rc, summary, err = run(capsys, tmp_path / "t.jsonl", tmp_path / "o")
  assert rc == 0 and summary["written"] == 1 and summary["written_with_caption"] == 0
  assert "has no 'caption' column (columns: ['image', 'text'])" in err and "--caption_key" in err, err
  rc, summary, err = run(capsys, tmp_path / "t.jsonl", tmp_path / "p", "--caption_key", "text")
  assert rc == 0 and summary["written_with_caption"] == 1 and "note" not in err


def test_captions_jsonl_entries_that_name_no_image_are_counted(tmp_path, capsys):
  folder = tmp_path / "f"
  (folder / "sub").mkdir(parents=True)
  (folder / "sub" / "1.png").write_bytes(png(1))
  (folder / "2.png").write_bytes(png(2))
  lines = [{"file": "sub\\1.png", "caption": "one"}, {"file": "gone.png", "caption": "lost"}]
  (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  src = sources.FolderSource(folder)
  err = capsys.readouterr().err
  assert "1 of 2 entries" in err and "'gone.png'" in err, err
  assert [src.caption(i) for i in range(2)] == [None, "one"]  # "2.png", "sub/1.png": the backslash read as /


def test_a_dst_that_cannot_be_made_and_a_full_disk_stop_with_one_line(tmp_path, capsys, monkeypatch):
  folder = tmp_path / "f"
  folder.mkdir()
  for i in range(4):
    (folder / f"{i}.png").write_bytes(png(i))
  (tmp_path / "file").write_text("x")
  rc, _, err = run(capsys, folder, tmp_path / "file" / "sub")
  assert rc == 2 and "cannot be created" in err and "give a writable folder" in err and "\n" not in err, err
  from array_record.python import array_record_module as ar

  real = ar.ArrayRecordWriter
  written = []

  class FillsUp:  # the second shard's first write meets a full disk, as array_record reports it

    def __init__(self, path, options):
      self.inner, self.path = real(path, options), path

    def write(self, data):
      if written and "00001" in self.path:
        raise RuntimeError("write() failed: No space left on device; writing " + self.path)
      self.inner.write(data)

    def close(self):
      written.append(self.path)
      self.inner.close()

  monkeypatch.setattr(ar, "ArrayRecordWriter", FillsUp)
  dst = tmp_path / "o"
  args = ["--src", str(folder), "--dst", str(dst), "--shards", "2", "--no_progress"]
  assert prepare.main(args) == 1
  err = capsys.readouterr().err.strip()
  assert "No space left on device" in err and "rerun the same command to resume" in err and "\n" not in err, err
  assert [p.name for p in dst.glob("*.array_record")] == ["data-00000-of-00002.array_record"]
  assert not [p for p in os.listdir(dst) if ".tmp-" in p]  # no half shard
  monkeypatch.setattr(ar, "ArrayRecordWriter", real)
  assert prepare.main(args) == 0  # the rerun resumes: the first shard kept, the second written
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (summary["shards_already_done"], summary["written"]) == (1, 4)


def test_tfds_damaged_or_with_other_feature_names(tmp_path, capsys):
  tfds = pytest.importorskip("tensorflow_datasets")

  class OtherNames(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
              {"img": tfds.features.Tensor(shape=(), dtype=np.object_), "text": tfds.features.Text()}
          ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, {"img": png(i), "text": f"t{i}"}

  builder = OtherNames(data_dir=str(tmp_path / "tfds"), file_format="array_record")
  builder.download_and_prepare()
  capsys.readouterr()  # tfds's own report
  rc, _, err = run(capsys, builder.data_dir, tmp_path / "o")  # a wrong key fails at open, before any record
  assert rc == 2 and "has no feature 'image' (features: ['img', 'text']); set --image_key" in err, err
  rc, summary, err = run(capsys, builder.data_dir, tmp_path / "o", "--image_key", "img")
  assert rc == 0 and summary["written"] == 3 and summary["written_with_caption"] == 0
  assert "no 'caption' feature" in err, err
  with pytest.raises(DataConfigError, match="set data.image_key"):
    sources.TfdsSource(builder.data_dir, "train", "image", None)
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "dataset_info.json").write_text("garbage")
  with pytest.raises(DataConfigError, match="cannot be opened as a TFDS dataset.*check its dataset_info.json"):
    sources.TfdsSource(damaged)
  rc, _, err = run(capsys, damaged, tmp_path / "o")
  assert rc == 2 and "dataset_info.json" in err and "\n" not in err, err


def test_a_list_of_captions_gives_its_first_caption_not_its_repr(tmp_path, capsys):
  pq = pytest.importorskip("pyarrow.parquet")
  pa = pytest.importorskip("pyarrow")
  rows = [  # COCO-style: several captions an image (the first blank one is passed over), and an empty list
      {"image": {"bytes": png(0), "path": None}, "caption": ["  ", "a red circle", "a circle"]},
      {"image": {"bytes": png(1), "path": None}, "caption": []},
  ]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "coco.parquet")
  rc, summary, err = run(capsys, tmp_path / "coco.parquet", tmp_path / "o")
  assert rc == 0 and summary["written"] == 2 and summary["written_with_caption"] == 1, err
  assert captions_of(tmp_path / "o") == ["", "a red circle"]
  assert sources.ParquetSource(tmp_path / "coco.parquet")[0]["caption"] == "a red circle"  # training reads it alike
