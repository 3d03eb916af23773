"""Pre-train the tiny world's MLLM (InternViT → pixel shuffle → projector → Qwen2 + LM head) on shapes and captions.

  python -m iomm_jax.pretrain_mllm --config=configs/tiny_mllm.py --out=runs/tiny_mllm [--config.train.num_steps=N]

Two phases, as InternVL starts from a vision encoder pre-trained on its own: first the ViT alone as a classifier of
the object's shape on single-object scenes (config.vision_pretrain; its head is discarded), then the whole MLLM on
captioning turns (image + instruction → caption) and text-only turns (a caption in any of the world's phrasings →
the caption in its plain grammar) with a next-token loss.
Reports held-out caption accuracy by greedy decoding (exact caption, colour, shape, relation, against chance; also
per number of objects in the scene), and writes a transformers InternVL -hf folder (config.json, model.safetensors, tokenizer
files, mllm_pretrain.json) that IOMM loads with --config.model.mllm.path=DIR. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from iomm_jax import app_exit
from iomm_jax import config_cli
from iomm_jax.config import ConfigError
from iomm_jax.mllm_pretrain import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/tiny_mllm.py[:short]", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "the -hf folder to write (replaced if it exists)")


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)  # not JAX's INFO line about the TPU backend it did not find
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value> to override config fields")
  if not _OUT.value:
    raise app.UsageError("--out is required")

  try:
    report = trainer.pretrain(_CONFIG.value, _OUT.value)
  except ConfigError as e:
    raise SystemExit(f"config error: {e}") from None
  print(json.dumps({"out": _OUT.value, **report}))
  return 0


if __name__ == "__main__":
  parser = config_cli.flags_parser(_CONFIG, sections=trainer.CONFIG_SECTIONS, example="configs/tiny_mllm.py")
  sys.exit(app.run(lambda argv: app_exit.run(main, argv), flags_parser=parser))
