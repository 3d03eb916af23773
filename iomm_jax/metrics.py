"""Metrics: metrics.jsonl + TensorBoard scalars/images (process 0 only), throughput and MFU."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time

import numpy as np

from iomm_jax import jsonl, output_folder, workdir_layout


class MetricsWriteError(OSError):
  """metrics.jsonl could not be appended to (a full disk, a read-only mount); the message says what to do."""


class MetricsFileError(ValueError):
  """A row of metrics.jsonl before its last does not parse (edited by hand, or another file put there)."""


class MetricsWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars/images to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir_layout.path(workdir, workdir_layout.METRICS)
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter

      _quiet_event_thread_errors()

      # A queue far longer than one logged row: a writer thread that died is noticed (`_tensorboard`) before the
      # queue could fill, as a full one blocks the next event for ever.
      self._tb = SummaryWriter(workdir_layout.path(workdir, workdir_layout.TENSORBOARD), max_queue=TB_QUEUE)

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _py(v) for k, v in values.items()})
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:  # a row cut short by this is dropped when the resumed run reads the file
      raise MetricsWriteError(
          f"{self.path}: cannot log step {row['step']} ({e.strerror or e}); free space or move the workdir, then "
          "rerun: training resumes from its newest checkpoint"
      ) from None
    tb = self._tensorboard()
    for k, v in row.items():
      if tb is not None and k != "step" and isinstance(v, (int, float)):
        tb.add_scalar(k, v, step)

  def truncate_after(self, step: int) -> int:
    """Drop rows logged after `step` (a resumed run re-logs them); returns how many were dropped."""
    if not self.enabled or not os.path.exists(self.path):
      return 0
    rows = read_metrics(os.path.dirname(self.path))
    keep = [r for r in rows if r["step"] <= step]
    with output_folder.atomic_file(self.path, sole_writer=True) as tmp:  # a kill leaves the old file whole
      tmp.write_text(jsonl.text(keep))
    return len(rows) - len(keep)

  def image(self, step: int, tag: str, image_hwc_uint8: np.ndarray) -> None:
    tb = self._tensorboard()
    if tb is not None:
      tb.add_image(tag, image_hwc_uint8, step, dataformats="HWC")

  def flush(self) -> None:
    if self._tb is not None:
      try:
        self._tb.flush()
      except OSError as e:
        self._drop_tensorboard(e)

  def close(self) -> None:
    if self._tb is not None:
      try:
        self._tb.close()
      except OSError as e:
        self._drop_tensorboard(e)
      self._tb = None

  def _tensorboard(self):
    """The TensorBoard writer while its writer thread lives; one that died writing (a full disk) is dropped with
    one line, or the next event would wait forever on its full queue."""
    if self._tb is None:
      return None
    for file_writer in (getattr(self._tb, "all_writers", None) or {}).values():
      worker = getattr(getattr(file_writer, "event_writer", None), "_worker", None)
      if worker is not None and not worker.is_alive():
        self._drop_tensorboard(_EVENT_THREAD_ERRORS.get(worker) or OSError("its writer thread stopped"))
        return None
    return self._tb

  def _drop_tensorboard(self, error: OSError) -> None:
    """The TensorBoard mirror could not be written (a full disk): stop it with one line, training goes on or ends as
    it would; metrics.jsonl, which resumes and reports read, is written (or refused) on its own."""
    tb, self._tb = self._tb, None
    for file_writer in (getattr(tb, "all_writers", None) or {}).values():
      events = getattr(file_writer, "event_writer", None)
      try:  # no second try at exit (tensorboardX's atexit close) or from its writer thread: each would raise again
        events._closed = True
        events._worker._queue.put(events._worker._shutdown_signal)
      except Exception:  # noqa: BLE001 — tensorboardX's internals; best effort
        pass
    print(
        f"note: TensorBoard events under {os.path.dirname(self.path)} stopped ({error.strerror or error}); "
        f"{workdir_layout.METRICS} keeps every logged row",
        file=sys.stderr,
    )


TB_QUEUE = 10_000
_EVENT_THREAD_ERRORS: dict = {}  # tensorboardX writer thread → the OSError that ended it


def _quiet_event_thread_errors() -> None:
  """A tensorboardX writer thread that dies on an OSError (a full disk) is recorded for MetricsWriter to report in
  one line, not printed as a thread traceback; every other thread's exception is reported as before."""
  if getattr(threading.excepthook, "_iomm_quiet_events", False):
    return
  previous = threading.excepthook

  def hook(args):
    if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_EventLoggerThread":
      _EVENT_THREAD_ERRORS[args.thread] = args.exc_value
      return
    previous(args)

  hook._iomm_quiet_events = True
  threading.excepthook = hook


def _py(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def read_metrics(workdir: str) -> list[dict]:
  """All rows of `<workdir>/metrics.jsonl` (empty list if none)."""
  path = workdir_layout.path(workdir, workdir_layout.METRICS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split("\n")
  # Rows are appended whole, so only the last can be cut short (a kill or a full disk mid-write): with no newline
  # after it, a row that does not parse is dropped, and the resumed run logs that step again.
  tail = lines.pop()
  rows = []
  for n, line in enumerate(lines, 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except ValueError as e:
        raise MetricsFileError(f"{path}:{n}: not a metrics row ({e}); delete or repair that line") from None
  if tail.strip():
    try:
      rows.append(json.loads(tail))
    except ValueError:
      pass
  return rows


class Throughput:
  """Wall time per logging window, split into time waiting for data and the rest."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.start = time.perf_counter()
    self.data_wait = 0.0
    self.steps = 0

  def add_wait(self, seconds: float):
    self.data_wait += seconds

  def exclude(self, seconds: float):
    """Leave `seconds` of work that is not training (validation, grids) out of this window's step time."""
    self.start += seconds

  def summary(
      self, global_batch: int, num_devices: int, tokens_per_image: int, flops_per_step: float, peak_flops: float
  ) -> dict:
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    steps = max(self.steps, 1)
    step_time = elapsed / steps
    return {
        "step_time_s": step_time,
        "images_per_s": global_batch / step_time,
        "tokens_per_s_per_device": global_batch * tokens_per_image / step_time / num_devices,
        "data_wait_fraction": self.data_wait / elapsed,
        "mfu": mfu(flops_per_step, step_time, peak_flops, num_devices),
    }


def mfu(flops: float, step_s: float, peak_flops: float, devices: int) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' peak (NaN when the time or the peak is not positive)."""
  return flops / step_s / (peak_flops * devices) if step_s > 0 and peak_flops > 0 else math.nan
