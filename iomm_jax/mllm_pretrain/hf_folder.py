"""Write the trained tiny MLLM as a transformers InternVL `-hf` folder: config.json, model.safetensors (the llava
file layout that InternVL3-2B-hf uses, LM head included) and the tokenizer files, so IOMM loads it through
model.mllm.path exactly as it loads InternVL3-2B.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from iomm_jax.config import ConfigError
from iomm_jax.weights import components, transfer
from iomm_jax.models import keymap

REPORT_FILE = "mllm_pretrain.json"  # training and caption-accuracy report, written beside the weights


def check_replaceable(dst: str | os.PathLike) -> None:
  """Refuse, before any training, an --out that is a file or a non-empty folder this command did not write (no
  REPORT_FILE): `write` replaces what is at dst, and --out=runs would take every run with it."""
  dst = Path(dst)
  if dst.exists() and not dst.is_dir():
    raise ConfigError(f"--out={dst} is a file; give a folder for the MLLM")
  if dst.is_dir() and any(dst.iterdir()) and not (dst / REPORT_FILE).is_file():
    raise ConfigError(
        f"--out={dst} is a non-empty folder that this command did not write (no {REPORT_FILE}); it would be "
        "replaced, so give a new or empty folder"
    )


def write(dst: str | os.PathLike, cfg, params, tokenizer, report: dict) -> Path:
  """Writes the folder atomically (a temporary sibling renamed into place), replacing an older one at dst."""
  check_replaceable(dst)
  dst = Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    spec = components.spec("mllm")
    transfer.write_torch_folder(spec, cfg, keymap.flatten_state(params), tmp)
    tokenizer.save_pretrained(str(tmp))
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    if dst.exists():
      old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return dst
