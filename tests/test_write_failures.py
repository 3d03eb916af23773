"""A full disk reported by array_record, safetensors or Orbax becomes one OSError naming the output (write_failures),
and the converter says it in one line with nothing half written."""

import errno
import os

import pytest
from safetensors import SafetensorError

from iomm_jax import write_failures
from torch_checkpoints import run_cli, write_rqa

# The reports as the libraries word them (copied from runs on a full tmpfs).
ARRAY_RECORD = (
    "write() failed: No space left on device; writing /d/.x.tmp-1; at byte 94208; Failed to close chunk_writer"
)
SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"
ORBAX = (
    'RESOURCE_EXHAUSTED: Error writing "a.kernel/0.0" in OCDBT database at local file "/d/.j.tmp-1/params/": Failed '
    'writing: "/d/.j.tmp-1/params/d/cda1": Failed to write 5783 bytes to file 4: No space left on device '
    "[os_error_code='28']"
)


@pytest.mark.parametrize("exc", [RuntimeError(ARRAY_RECORD), SafetensorError(SAFETENSORS), ValueError(ORBAX)])
def test_each_librarys_full_disk_is_one_oserror_about_the_output(exc):
  with pytest.raises(OSError) as e:
    with write_failures.writing("/out/model"):
      raise exc
  assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOSPC, "No space left on device", "/out/model")


def test_other_errors_pass_unchanged():
  for exc in (
      RuntimeError("XLA: out of memory"),
      ValueError("shape mismatch"),
      PermissionError(13, "denied", "/elsewhere"),
  ):
    with pytest.raises(type(exc)) as e:
      with write_failures.writing("/out"):
        raise exc
    assert e.value is exc


def test_an_oserror_without_a_file_is_given_the_output():
  with pytest.raises(OSError) as e:  # Pillow's full disk names no file
    with write_failures.writing("/out/grid.png"):
      raise OSError(errno.ENOSPC, "No space left on device")
  assert (e.value.errno, e.value.filename) == (errno.ENOSPC, "/out/grid.png")


def test_a_failed_write_of_an_unknown_errno_keeps_the_librarys_first_line():
  err = write_failures.as_oserror(RuntimeError("write() failed: quota\nmore"), "/o")
  assert (err.errno, err.strerror, err.filename) == (None, "write() failed: quota", "/o")


def test_the_converter_on_a_full_disk_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
  import safetensors.numpy

  write_rqa(str(tmp_path / "src"))
  assert run_cli("to-jax", "--component", "rqa", "--src", tmp_path / "src", "--dst", tmp_path / "j") == 0

  def full(*args, **kwargs):
    raise SafetensorError(SAFETENSORS)

  monkeypatch.setattr(safetensors.numpy, "save_file", full)
  capsys.readouterr()
  assert run_cli("to-torch", "--component", "rqa", "--src", tmp_path / "j", "--dst", tmp_path / "t") == 1
  err = capsys.readouterr().err
  assert err == f"error: {tmp_path / 't'}: No space left on device (free some space, or write the output elsewhere)\n"
  assert sorted(os.listdir(tmp_path)) == ["j", "src"]  # no folder, no temporary sibling


def test_orbax_on_a_full_disk_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
  import orbax.checkpoint as ocp

  write_rqa(str(tmp_path / "src"))

  def full(self, *args, **kwargs):
    raise ValueError(ORBAX)

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
  assert run_cli("to-jax", "--component", "rqa", "--src", tmp_path / "src", "--dst", tmp_path / "j") == 1
  assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'j'}: No space left on device (")
  assert sorted(os.listdir(tmp_path)) == ["src"]
