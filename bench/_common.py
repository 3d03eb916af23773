"""What the bench scripts share at start: this checkout's root, and a user's mistake as one line without a traceback.

Every script is run as `python bench/<name>.py`, so Python puts bench/ (not the root) first on sys.path; each one
therefore starts with the one line that cannot live here, which puts this checkout's root first (before an
installed iomm_jax from another checkout), then imports this module:

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import _common  # noqa: E402

A count flag is refused when parsing (`count`, `counts` for argparse; absl's `lower_bound` for absl flags), so
before any heavy work. `run` ends an argparse script's main as the apps do (`iomm_jax.app_exit.run`, plus the user
errors training reports in one line); `absl_run` does the same for an absl script with a `--config` flag, whose
problems `iomm_jax.config_cli` words as training's own command line does.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _whole_number(text: str, minimum: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"give a whole number, {minimum} or more, not {text!r}") from None
  if value < minimum:
    raise argparse.ArgumentTypeError(f"give {minimum} or more, not {value}")
  return value


def count(minimum: int = 1) -> Callable[[str], int]:
  """An argparse `type=` for a count: a whole number ≥ `minimum` (argparse names the flag in its one-line error)."""

  def parse(text: str) -> int:
    return _whole_number(text, minimum)

  parse.__name__ = "count"
  return parse


def counts(minimum: int = 1) -> Callable[[str], list[int]]:
  """An argparse `type=` for comma-separated counts ('0,1,2'), each ≥ `minimum`; empty items are skipped."""

  def parse(text: str) -> list[int]:
    return [_whole_number(x.strip(), minimum) for x in text.split(",") if x.strip()]

  parse.__name__ = "counts"
  return parse


def run(main: Callable[..., int | None], *args) -> int | None:
  """`main(*args)` as the apps end: Ctrl-C and an OSError through `app_exit.run`, a config problem as 'config
  error: …' and the other user errors (`USER_ERRORS`: a missing data path, an unreadable MLLM folder, …) as
  'error: …', each one line with exit status 1, as `iomm_jax.main` reports them (`user_errors.as_one_line`)."""
  from iomm_jax import app_exit
  from iomm_jax.train import user_errors

  def guarded(*a):
    with user_errors.as_one_line():
      return main(*a)

  return app_exit.run(guarded, *args)


def config_parser(config_flag, flag_values=None):
  """The absl `flags_parser` of training's command line for an IOMM `--config` flag
  (`config_validation.run_flags_parser`)."""
  from iomm_jax.config_validation import run_flags_parser

  return run_flags_parser(config_flag, flag_values)


def absl_run(main: Callable, config_flag) -> None:
  """`app.run(main)` for an absl bench script with an IOMM `--config` flag: flag and config problems at parsing,
  user errors while it runs, each as one line (`config_parser`, `run`)."""
  from absl import app

  app.run(lambda argv: run(main, argv), flags_parser=config_parser(config_flag))
