"""A command stopped by Ctrl-C, or refused by its file system, ends in one line and an exit status; outputs that
cannot be written are refused before the work; a file is replaced whole or not at all."""

import errno
import os
import subprocess
import sys

import pytest

from helpers import ROOT
from iomm_jax import app_exit, output_folder


def _run(body: str):
  code = f"import sys\nfrom iomm_jax import app_exit\ndef main():\n  {body}\nsys.exit(app_exit.run(main))\n"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_ctrl_c_is_one_line_and_status_130():
  r = _run("raise KeyboardInterrupt")
  assert r.returncode == app_exit.EXIT_INTERRUPTED == 130
  assert r.stderr.strip() == "stopped by Ctrl-C", r.stderr


def test_sigterm_is_one_line_and_status_143_after_the_commands_cleanup(tmp_path):
  """`kill` or a scheduler's stop unwinds like Ctrl-C: a temporary output folder being written is removed."""
  dst = tmp_path / "out"
  r = _run(
      "from iomm_jax import output_folder\n"
      "  import os, signal\n"
      f"  with output_folder.replacing({str(dst)!r}) as tmp:\n"
      "    (tmp / 'half.bin').write_bytes(b'x')\n"
      "    os.kill(os.getpid(), signal.SIGTERM)\n"
      "    raise AssertionError('SIGTERM did not stop the command')"
  )
  assert r.returncode == app_exit.EXIT_TERMINATED == 143
  assert r.stderr.strip() == "stopped by SIGTERM", r.stderr
  assert os.listdir(tmp_path) == []  # neither the temporary folder nor the parent it made


def test_a_file_system_refusal_names_the_path_and_what_to_do():
  r = _run("raise OSError(28, 'No space left on device', '/out/grid.png')")
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert (
      r.stderr.strip()
      == "error: /out/grid.png: No space left on device (free some space, or write the output elsewhere)"
  )
  assert app_exit.describe(OSError(errno.EROFS, "Read-only file system", "/ro/x")).endswith("to a writable folder)")
  assert _run("return 3").returncode == 3  # anything else passes through


def _mount(tmp_path, name, options):
  mnt = tmp_path / name
  mnt.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
  if r.returncode:
    pytest.skip("cannot mount a tmpfs here")
  return mnt


def test_outputs_on_a_read_only_or_full_file_system_are_refused_before_the_work(tmp_path):
  ro, full = _mount(tmp_path, "ro", "size=1m,ro"), _mount(tmp_path, "full", "size=64k")
  try:
    with open(full / "filler", "wb") as f:
      try:
        f.write(b"x" * (1 << 20))  # fill it
      except OSError:
        pass
    for path, folder in ((ro / "out", True), (ro / "report.json", False)):
      assert "cannot be written to (read-only or no permission)" in output_folder.path_problem(path, folder)
    assert "full filesystem" in output_folder.path_problem(full / "new" / "grid.png", folder=False)
    assert output_folder.path_problem(tmp_path / "fine" / "x.png", folder=False) == ""
    assert "read-only" in output_folder.replace_problem(ro / "export", flag="--dst", markers=("m",))
  finally:
    for mnt in (ro, full):
      subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
  target = tmp_path / "report.json"
  target.write_text("old")
  with pytest.raises(OSError):
    with output_folder.atomic_file(target) as tmp:
      tmp.write_text("half")
      raise OSError(errno.ENOSPC, "No space left on device")
  assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["report.json"]
  with output_folder.atomic_file(target) as tmp:
    assert tmp.suffix == ".json" and tmp.parent == tmp_path
    tmp.write_text("new")
  assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["report.json"]


def test_a_failed_first_write_leaves_no_folder_it_created(tmp_path):
  target = tmp_path / "new" / "deeper" / "grid.png"
  with pytest.raises(OSError):
    with output_folder.atomic_file(target) as tmp:
      tmp.write_bytes(b"half")
      raise OSError(errno.ENOSPC, "No space left on device")
  assert os.listdir(tmp_path) == []  # both folders it made are gone; tmp_path, which was there, stays
  (tmp_path / "new").mkdir()
  (tmp_path / "new" / "kept.png").write_bytes(b"earlier")
  with pytest.raises(OSError):
    with output_folder.atomic_file(target) as tmp:
      raise OSError(errno.ENOSPC, "No space left on device")
  assert os.listdir(tmp_path / "new") == ["kept.png"]  # a folder that was there stays, with what it held
  with output_folder.atomic_file(target) as tmp:
    tmp.write_bytes(b"whole")
  assert target.read_bytes() == b"whole"


def test_a_failed_folder_replacement_names_the_destination_and_leaves_nothing(tmp_path):
  dst = tmp_path / "new" / "pipeline"
  with pytest.raises(OSError) as failed:
    with output_folder.replacing(dst) as tmp:
      (tmp / "transformer").mkdir()
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "transformer" / "model.safetensors"))
  assert failed.value.filename == str(dst / "transformer" / "model.safetensors") and failed.value.errno == errno.ENOSPC
  assert os.listdir(tmp_path) == []  # neither the temporary folder nor the parent it created is left
  elsewhere = OSError(errno.EACCES, "Permission denied", str(tmp_path / "input.json"))
  with pytest.raises(OSError) as failed:
    with output_folder.replacing(dst):
      raise elsewhere
  assert failed.value is elsewhere  # an error about another file passes unchanged


def test_an_atomic_file_can_hide_its_suffix_and_may_write_nothing(tmp_path):
  target = tmp_path / "data-0.array_record"
  with output_folder.atomic_file(target, keep_suffix=False) as tmp:  # not a `*.array_record` a reader would glob
    assert tmp.name.startswith(".data-0.array_record.tmp-") and not list(tmp_path.glob("*.array_record"))
    tmp.write_bytes(b"shard")
  assert target.read_bytes() == b"shard"
  with output_folder.atomic_file(target, skip_if_unwritten=True) as tmp:
    tmp.write_bytes(b"empty")
    tmp.unlink()  # the block decided to write nothing: the old file stays
  assert target.read_bytes() == b"shard" and sorted(os.listdir(tmp_path)) == [target.name]
  with pytest.raises(FileNotFoundError):  # by default a block that wrote nothing is an error
    with output_folder.atomic_file(target):
      pass
  assert target.read_bytes() == b"shard"


def test_a_sole_writers_atomic_file_drops_a_killed_writers_leftovers(tmp_path):
  target = tmp_path / "metrics.jsonl"
  target.write_text("old\n")
  (tmp_path / ".metrics.tmp-0badc0de.jsonl").write_text("half")  # a kill between the write and the rename
  (tmp_path / ".metrics.jsonl.tmp-0badc0de").write_text("half")
  (tmp_path / ".other.tmp-0badc0de.jsonl").write_text("not ours")
  with output_folder.atomic_file(target) as tmp:  # by default another writer's temporary file is left alone
    tmp.write_text("new\n")
  assert len(list(tmp_path.glob(".metrics*"))) == 2
  with output_folder.atomic_file(target, sole_writer=True) as tmp:
    tmp.write_text("newer\n")
  assert target.read_text() == "newer\n"
  assert sorted(os.listdir(tmp_path)) == [".other.tmp-0badc0de.jsonl", "metrics.jsonl"]
