"""Write the trained tiny MLLM as a transformers InternVL `-hf` folder: config.json, model.safetensors (the llava
file layout that InternVL3-2B-hf uses, LM head included) and the tokenizer files, so IOMM loads it through
model.mllm.path exactly as it loads InternVL3-2B.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from iomm_jax import output_folder, write_failures
from iomm_jax.config import ConfigError
from iomm_jax.weights import components, transfer
from iomm_jax.models import keymap

REPORT_FILE = "mllm_pretrain.json"  # training and caption-accuracy report, written beside the weights


def check_replaceable(dst: str | os.PathLike, needs: int = 0) -> None:
  """Refuse, before any training, an --out that cannot be made, lacks the `needs` bytes of the weights, or is a
  non-empty folder this command did not write (no REPORT_FILE): `write` replaces what is at dst, and --out=runs
  would take every run with it."""
  problem = output_folder.replace_problem(dst, flag="--out", markers=(REPORT_FILE,), needs=needs)
  if problem:
    raise ConfigError(problem)


def write(dst: str | os.PathLike, cfg, params, tokenizer, report: dict) -> Path:
  """Writes the folder atomically (a temporary sibling renamed into place), replacing an older one at dst."""
  check_replaceable(dst)
  with write_failures.writing(dst), output_folder.replacing(dst) as tmp:  # a full disk: one line (app_exit)
    transfer.write_torch_folder(components.spec("mllm"), cfg, keymap.flatten_state(params), tmp)
    tokenizer.save_pretrained(str(tmp))
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
  return Path(dst)
