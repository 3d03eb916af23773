"""Output folders that commands write and may replace: checked before the work (so a mistake costs nothing), and
written under a temporary sibling that takes the folder's place only when complete (so a failure leaves the old
folder as it was, never half a new one). A command replaces only a folder it wrote itself, recognised by a marker
file inside it; anything else — a training workdir, a user's folder, the command's own input — is refused.

A replacement renames the old folder aside (``.NAME.old-PID-XXXXXXXX``), the new one (``.NAME.tmp-PID-XXXXXXXX``)
into place, then removes the old one. What a killed writer (PID) leaves beside NAME is tidied by the next writer of
NAME (:func:`clear_leftovers`): an old folder set aside with NAME missing (a kill between the two renames) is put
back, the rest is removed."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator, Sequence


def path_problem(path: str | os.PathLike, folder: bool, *, beside: bool = False, needs: int = 0) -> str:
  """Why `path` cannot be written as a folder (`folder`) or a file: it, or a folder above it, is a file, or a file's
  path is a folder, or the folder it would be written in is read-only, full, or has fewer than `needs` bytes free
  (the output's size where the command can tell it: at least that much); '' when it can. Checked before the work,
  so a command does not compute for minutes and then fail to write. `beside`: an existing folder is replaced by a
  sibling written next to it (so its parent must take writes), not written into."""
  path = Path(os.path.abspath(os.path.expanduser(path)))
  if path.exists():
    if folder and not path.is_dir():
      return f"{path} exists and is not a folder; give a folder"
    if not folder and path.is_dir():
      return f"{path} is a folder; give a file path"
    return _unwritable(path if folder and not beside else path.parent, needs)  # a file is replaced from beside it too
  for parent in path.parents:  # the nearest existing folder above it must be a folder, or nothing can be made
    if parent.exists():
      if not parent.is_dir():
        return f"{parent} is a file, so {path} cannot be made; give a path under a folder"
      return _unwritable(parent, needs)
  return ""


def _unwritable(folder: Path, needs: int = 0) -> str:
  """Why nothing (or not `needs` bytes) can be written in the existing `folder` (read-only, no permission, no free
  space); ''."""
  if not os.access(folder, os.W_OK | os.X_OK):  # EROFS on a read-only filesystem, even for root
    return f"{folder} cannot be written to (read-only or no permission); choose a folder you can write to"
  try:
    stat = os.statvfs(folder)
  except OSError:
    return ""
  free = stat.f_bavail * stat.f_frsize
  if free == 0:
    return f"{folder} is on a full filesystem (no free space); free some or choose another folder"
  if free < needs:
    return (
        f"{folder} has {free:,} bytes free and the output needs at least {needs:,}; free some or choose another "
        "folder"
    )
  return ""


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
  """Whether the paths `a` and `b` are one folder, or one lies inside the other (links resolved)."""
  a, b = (Path(os.path.abspath(os.path.expanduser(p))).resolve() for p in (a, b))
  return a == b or a in b.parents or b in a.parents


def replace_problem(
    dst: str | os.PathLike,
    *,
    flag: str,
    markers: Sequence[str],
    overwrite: bool = True,
    source: str | os.PathLike | None = None,
    source_flag: str = "--src",
    needs: int = 0,
) -> str:
  """Why `dst` cannot become (or replace) this command's output folder; '' when it can. A non-empty `dst` is
  replaced only with `overwrite` and only when it holds one of `markers` (files only this command writes); `dst`
  must neither be, hold nor lie inside `source` (the command's input); `needs`: as path_problem's. A killed earlier
  replacement of `dst` is tidied first (clear_leftovers), so the answer is about the folder it left."""
  problem = path_problem(dst, folder=True, beside=True, needs=needs)
  if problem:
    return f"{flag}={dst}: {problem}"
  clear_leftovers(dst)
  d = Path(os.path.abspath(os.path.expanduser(dst))).resolve()
  if source is not None and overlaps(dst, source):
    return f"{flag}={dst} is, holds or lies inside {source_flag}={source}; write the output to another folder"
  if d.is_dir() and any(d.iterdir()):
    if not overwrite:
      return f"{flag}={dst} exists and is not empty; choose a new folder or pass --overwrite"
    if not any((d / m).exists() for m in markers):
      return (
          f"{flag}={dst} is a non-empty folder that this command did not write (no {' or '.join(markers)}); it "
          "would be replaced, so give a new or empty folder"
      )
  return ""


@contextlib.contextmanager
def replacing(dst: str | os.PathLike) -> Iterator[Path]:
  """Yields a new temporary sibling of `dst` to write the output into. When the block completes it takes `dst`'s
  place (a folder there before is removed only then); when the block fails it is removed, with the folders the call
  created for it, and `dst` is untouched. An OSError about a file inside the temporary folder names that file's
  place in `dst` instead (the temporary folder is gone when the user reads it)."""
  dst = Path(os.path.abspath(os.path.expanduser(dst)))
  created = _missing_ancestors(dst.parent)
  dst.parent.mkdir(parents=True, exist_ok=True)
  clear_leftovers(dst)
  tmp = sibling(dst, "tmp")
  tmp.mkdir()
  committed = False
  try:
    try:
      yield tmp
    except OSError as e:
      names = [_in_place_of(f, tmp, dst) for f in (e.filename, e.filename2)]
      if e.errno is None or names == [e.filename, e.filename2]:
        raise
      raise OSError(e.errno, e.strerror, names[0], None, names[1]) from None
    swap_in(tmp, dst)
    committed = True
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
    if not committed:
      _remove_if_empty(created)


def sibling(dst: str | os.PathLike, kind: str) -> Path:
  """A new name beside `dst` for this process's `kind` ("tmp": the new folder being written; "old": the folder it
  replaces, set aside): ``.NAME.KIND-PID-XXXXXXXX``, the PID telling clear_leftovers whether its writer still runs."""
  dst = Path(dst)
  return dst.parent / f".{dst.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def swap_in(tmp: Path, dst: Path) -> None:
  """Renames the folder `tmp` to `dst`. A folder at `dst` is renamed aside first (``sibling(dst, "old")``) and
  removed last; a failed second rename puts it back, and a kill between the two leaves it for the next writer of
  `dst` to put back (clear_leftovers)."""
  if not dst.exists():
    os.rename(tmp, dst)
    return
  old = sibling(dst, "old")
  os.rename(dst, old)
  try:
    os.rename(tmp, dst)
  except BaseException:
    with contextlib.suppress(OSError):
      os.rename(old, dst)
    raise
  shutil.rmtree(old, ignore_errors=True)


_LEFTOVER = re.compile(r"(?P<kind>tmp|old)-(?:(?P<pid>[1-9][0-9]*)-)?[0-9a-f]{8}")


def writer_runs(pid: int) -> bool:
  """Whether the process `pid` on this machine still runs (a zombie, dead but not yet reaped, does not)."""
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  except (OverflowError, ValueError, OSError):  # not a pid this system can have
    return False
  try:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rpartition(")")[2].split()[0]  # after "(comm)", which may hold spaces and parentheses
  except (OSError, IndexError):
    return True
  return state not in ("Z", "X")


def clear_leftovers(dst: str | os.PathLike) -> None:
  """Tidies what killed writers of the folder `dst` left beside it (``sibling`` names whose PID no longer runs).
  When `dst` is missing, the folder a writer had set aside to swap its new one in (a kill between the two renames)
  is renamed back, saying so in one line on stderr; the newest when there are several. Then the dead writers'
  temporary folders, and their old folders once `dst` exists, are removed. A live writer's folders are never
  touched, nor a name without a PID (written before names had one), except an old folder put back."""
  dst = Path(os.path.abspath(os.path.expanduser(dst)))
  prefix = f".{dst.name}."
  try:
    names = [n for n in os.listdir(dst.parent) if n.startswith(prefix)]
  except OSError:  # no parent folder yet, or one that cannot be listed: nothing to tidy
    return
  dead = {"tmp": [], "old": []}
  for name in names:
    m = _LEFTOVER.fullmatch(name[len(prefix) :])
    if m and (m["pid"] is None or not writer_runs(int(m["pid"]))):
      dead[m["kind"]].append((m["pid"] is not None, dst.parent / name))
  if not os.path.lexists(dst) and dead["old"]:
    newest = max(dead["old"], key=lambda x: _ctime(x[1]))
    try:
      os.rename(newest[1], dst)
    except OSError:
      pass
    else:
      dead["old"].remove(newest)
      print(
          f"note: {dst} was missing (a run replacing it was stopped mid-swap); put back the earlier one from "
          f"{newest[1].name}",
          file=sys.stderr,
      )
  if not os.path.lexists(dst):
    dead["old"] = []  # the earlier output, until one is in place
  for has_pid, path in dead["tmp"] + dead["old"]:
    if has_pid:
      if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          path.unlink()


def _ctime(path: Path) -> float:
  try:
    return path.stat().st_ctime  # a rename sets it: the folder set aside last
  except OSError:
    return 0.0


def _in_place_of(filename, tmp: Path, dst: Path):
  """`filename` with the temporary folder `tmp` replaced by `dst` when it lies inside `tmp`; else as it was."""
  if filename is None:
    return None
  try:
    return str(dst / Path(os.path.abspath(filename)).relative_to(tmp))
  except (TypeError, ValueError):  # bytes, a descriptor, or a file elsewhere
    return filename


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike, *, keep_suffix: bool = True, skip_if_unwritten: bool = False, sole_writer: bool = False
) -> Iterator[Path]:
  """Yields a temporary sibling of the file `path` to write; it replaces `path` only when the block completes, so
  a full disk or a kill leaves the old file whole; it is removed when the block fails, with the folders the call
  created for it. Two files committed in order nest two blocks: the inner one's file replaces its target first.

  The temporary name is ``.STEM.tmp-XXXXXXXX.SUFFIX`` (the same suffix, for writers that pick the format by it);
  `keep_suffix=False` names it ``.NAME.tmp-XXXXXXXX`` instead, for a folder whose readers glob the suffix (pathlib's
  ``glob('*.array_record')`` matches hidden files too) and whose resume drops ``.NAME.tmp-*`` leftovers of a kill.
  `skip_if_unwritten`: a block that leaves no temporary file (it wrote nothing, or removed what it wrote) leaves
  `path` as it was instead of raising FileNotFoundError. `sole_writer`: no one else writes `path` (a workdir's
  files under its trainer lock), so temporary siblings found first are a killed writer's leftovers, and go."""
  path = Path(os.path.abspath(os.path.expanduser(path)))
  created = _missing_ancestors(path.parent)
  path.parent.mkdir(parents=True, exist_ok=True)
  if sole_writer:
    for pattern in (f".{path.stem}.tmp-*{path.suffix}", f".{path.name}.tmp-*"):
      for leftover in path.parent.glob(pattern):
        leftover.unlink(missing_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = path.parent / (f".{path.stem}.tmp-{tag}{path.suffix}" if keep_suffix else f".{path.name}.tmp-{tag}")
  committed = False
  try:
    yield tmp
    if not (skip_if_unwritten and not tmp.exists()):
      os.replace(tmp, path)
    committed = True
  finally:
    tmp.unlink(missing_ok=True)
    if not committed:  # a failed first write into a new folder leaves no empty folder behind
      _remove_if_empty(created)


def _missing_ancestors(folder: Path) -> list[Path]:
  """The folders of `folder`'s path (itself included) that do not exist yet, deepest first."""
  missing = []
  while not folder.exists() and folder != folder.parent:
    missing.append(folder)
    folder = folder.parent
  return missing


def _remove_if_empty(folders: list[Path]) -> None:
  """Removes `folders` (deepest first) while each is empty; stops at the first that holds anything."""
  for folder in folders:
    try:
      folder.rmdir()
    except OSError:
      return
