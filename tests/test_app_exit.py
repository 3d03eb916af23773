"""A command stopped by Ctrl-C, or refused by its file system, ends in one line and an exit status; outputs that
cannot be written are refused before the work; a file is replaced whole or not at all."""

import errno
import os
import subprocess
import sys
import time

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


# Run as `python -c KILLED_AFTER_RENAME + body ARG`: the process is SIGKILLed right after its first os.rename whose
# destination holds ARG, as a kill of the whole machine would stop it there.
KILLED_AFTER_RENAME = """
import os, signal, sys
_rename = os.rename
def _killing_rename(src, dst, *a, **kw):
  _rename(src, dst, *a, **kw)
  if sys.argv[1] in str(dst):
    os.kill(os.getpid(), signal.SIGKILL)
os.rename = _killing_rename
"""


def run_killed_after_rename(body: str, arg: str, *argv: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(
      [sys.executable, "-c", KILLED_AFTER_RENAME + body, arg, *argv], capture_output=True, text=True, cwd=ROOT, env=env
  )


def test_a_kill_between_the_swaps_renames_is_undone_by_the_next_writer(tmp_path, capsys):
  dst = tmp_path / "export"
  dst.mkdir()
  (dst / "old.txt").write_text("old")
  body = (
      "from iomm_jax import output_folder\n"
      f"with output_folder.replacing({str(dst)!r}) as tmp:\n"
      "  (tmp / 'new.txt').write_text('new')\n"
  )
  r = run_killed_after_rename(body, ".export.old-")
  assert r.returncode == -9, r.stderr
  assert not dst.exists()  # set aside, the new one not yet in its place
  assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".export.old", ".export.tmp"]
  # The next writer's check puts it back first, so a rerun without --overwrite is refused as before the kill.
  problem = output_folder.replace_problem(dst, flag="--dst", markers=("old.txt",), overwrite=False)
  assert "exists and is not empty" in problem and (dst / "old.txt").read_text() == "old"
  err = capsys.readouterr().err
  assert (
      err.count("\n") == 1 and f"note: {dst} was missing" in err and "put back the earlier one from .export.old-" in err
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the killed run's temporary folder went too
  # Without the check: replacing() alone puts it back, and then replaces it.
  r = run_killed_after_rename(body, ".export.old-")
  assert r.returncode == -9 and not dst.exists()
  with output_folder.replacing(dst) as tmp:
    assert (dst / "old.txt").read_text() == "old"
    (tmp / "newer.txt").write_text("newer")
  assert "put back the earlier one" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and os.listdir(dst) == ["newer.txt"]


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
  dst = tmp_path / "export"
  dst.mkdir()
  (dst / "old.txt").write_text("old")
  rename, calls = os.rename, []

  def failing_second(src, target):
    calls.append(target)
    if len(calls) == 2:
      raise OSError(errno.EIO, "Input/output error", str(src))
    rename(src, target)

  monkeypatch.setattr(os, "rename", failing_second)
  with pytest.raises(OSError, match="Input/output error"):
    with output_folder.replacing(dst) as tmp:
      (tmp / "new.txt").write_text("new")
  assert os.listdir(tmp_path) == ["export"] and os.listdir(dst) == ["old.txt"]


def _dead_pids():
  """The pid of a process that has exited and been reaped, and of one killed but not yet reaped (a zombie)."""
  done = subprocess.Popen([sys.executable, "-c", "pass"])
  done.wait()
  zombie = subprocess.Popen(["sleep", "60"])
  zombie.kill()
  for _ in range(200):
    with open(f"/proc/{zombie.pid}/stat") as f:
      if f.read().rpartition(")")[2].split()[0] == "Z":
        break
    time.sleep(0.01)
  return done.pid, zombie


def test_dead_writers_leftovers_are_removed_and_a_live_writers_kept(tmp_path):
  dead, zombie = _dead_pids()
  try:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "m").write_text("mine")
    gone = [f".out.tmp-{dead}-0badc0de", f".out.tmp-{zombie.pid}-0badc0de", f".out.old-{dead}-0badc0de"]
    kept = [
        f".out.tmp-{os.getpid()}-0badc0de",  # a live writer's (this process's) folder
        f".out.old-{os.getpid()}-0badc0de",
        ".out.tmp-0badc0de",  # no pid: whose it is cannot be told
        f".other.tmp-{dead}-0badc0de",  # another folder's
        f".out.b.tmp-{dead}-0badc0de",
    ]
    for name in gone + kept:
      (tmp_path / name).mkdir()
      (tmp_path / name / "big").write_bytes(b"x" * 1000)
    assert output_folder.writer_runs(os.getpid()) and not output_folder.writer_runs(dead)
    assert not output_folder.writer_runs(zombie.pid)
    with output_folder.replacing(dst) as tmp:
      (tmp / "m").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out"])
    assert (dst / "m").read_text() == "new"
  finally:
    zombie.wait()
