"""One trainer per workdir: process 0 holds `<workdir>/trainer.lock` (host, pid, start time) while it trains.

A second trainer exits at once naming the holder. A lock is stale, and taken over with a message, when its pid is
dead on this host, when it was written by an earlier incarnation of the same SLURM job (a requeue), or when its
holder has not refreshed it for STALE_AFTER_S seconds (a holder on another host that died: the holder touches the
file every HEARTBEAT_S seconds from a daemon thread, so long compiles do not make it look dead).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time

from iomm_jax import output_folder, workdir_layout

LOCK_NAME = workdir_layout.LOCK
HEARTBEAT_S = 30
STALE_AFTER_S = 300


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir; the message names it."""


def _me() -> dict:
  return {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
  }


def stale_reason(holder: dict, age_s: float) -> str | None:
  """Why the lock `holder` (age_s since its last heartbeat) is stale, or None when its trainer may be alive."""
  here = socket.gethostname()
  if holder.get("host") == here and holder.get("pid") == os.getpid():
    return None  # never our own lock
  if holder.get("host") == here and not output_folder.writer_runs(int(holder.get("pid", -1))):
    return f"its process {holder.get('pid')} on this host is gone"
  job = os.environ.get("SLURM_JOB_ID", "")
  if job and holder.get("slurm_job") == job:
    return f"it was written by an earlier run of this SLURM job {job} (requeued)"
  if age_s > STALE_AFTER_S:
    return f"its holder has not refreshed it for {age_s:.0f} s (> {STALE_AFTER_S} s)"
  return None


class WorkdirLock:
  """Context manager; `acquire()` raises WorkdirLockedError when a live trainer holds the workdir."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self.held = False
    self.took_over: str | None = None  # why a stale lock was taken over (the caller prints it)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(_me(), f)
    return True

  def acquire(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    for _ in range(3):  # create, or judge the existing lock and retry once it is removed
      if self._create():
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock-heartbeat")
        self._thread.start()
        return self
      try:
        with open(self.path) as f:
          holder = json.load(f)
        age = time.time() - os.path.getmtime(self.path)
      except (OSError, ValueError):
        holder, age = {}, 0.0  # being written this instant, or a torn write: treat as live, retry
        time.sleep(0.2)
        continue
      reason = stale_reason(holder, age)
      if reason is None:
        raise WorkdirLockedError(
            f"workdir {os.path.dirname(self.path)} is in use by another trainer (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, started {holder.get('start')}); wait for it to finish, stop it, or use another "
            f"--workdir (if that trainer is gone, delete {self.path})"
        )
      self.took_over = (
          f"took over the stale lock {self.path} of host {holder.get('host')} pid {holder.get('pid')} "
          f"(started {holder.get('start')}): {reason}"
      )
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    raise WorkdirLockedError(f"could not take the lock {self.path}: another trainer keeps creating it")

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    if not self.held:
      return
    self._stop.set()
    self.held = False
    try:
      with open(self.path) as f:
        held = json.load(f)
      mine = held.get("pid") == os.getpid() and held.get("host") == socket.gethostname()
      if mine:
        os.remove(self.path)
    except (OSError, ValueError):
      pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False
