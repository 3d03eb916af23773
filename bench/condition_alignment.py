"""Does the generator's condition say the same thing for an image and for its caption?

  python bench/condition_alignment.py --config=configs/tiny.py --config.model.mllm.path=DIR \
      [--config.init.workdir=W] [--num_train=1400] [--num_eval=300]

IOMM trains the generator on image conditions alone (stage 1) and expects text prompts to work because the frozen
MLLM reads an image and its caption alike. This bench measures that where the DiT reads it: the condition h (the
frozen LLM's hidden states at the Residual Query Adapter's query positions, `iomm.encode_condition`) of the run's
generator — random, or a trained workdir's EMA weights through `--config.init.workdir` — for single-object scenes
(unmasked, as at sampling) and for their captions ("a red circle"). Closed-form ridge probes
(`mllm_vision_probe.ridge_accuracy`) are fitted on image conditions of held-in scenes and scored for the object's
shape and colour on
  - ``image_to_image``: image conditions of held-out scenes (is the attribute in h at all?);
  - ``image_to_text``:  text conditions of the 6 × 7 captions (does the image-fitted read-out work on text?);
  - ``image_to_text_centred``: the same with each modality centred on its own mean (is the attribute's direction
    shared, whatever the constant offset between the two kinds of condition?).

Prints ONE JSON line: {"bench": "condition_alignment", "init", "shape": {...}, "colour": {...}, "chance": {...}}.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench import _common  # noqa: E402

# World draws no training run or other bench uses (IOMM trains on 0; the MLLM on 1, 2; the vision probe 11, 12).
TRAIN_SEED, EVAL_SEED = 21, 22
BATCH = 64  # conditions computed per call


def _define_flags():
  """The command line, defined only when run as a script (see oracle_condition._define_flags)."""
  global _CONFIG, _NUM_TRAIN, _NUM_EVAL
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg] (MLLM, adapter; init.workdir)")
  _NUM_TRAIN = flags.DEFINE_integer("num_train", 1400, "single-object scenes the probes are fitted on", lower_bound=1)
  _NUM_EVAL = flags.DEFINE_integer(
      "num_eval", 300, "held-out single-object scenes the image probes are scored on", lower_bound=1
  )


def alignment(train_x, train_y, image_x, image_y, text_x, text_y, num_classes: int) -> dict:
  """{'image_to_image', 'image_to_text', 'image_to_text_centred'}: accuracies of a ridge probe fitted on image
  conditions (train_x, train_y), scored on held-out image conditions and on text conditions."""
  from bench.mllm_vision_probe import ridge_accuracy

  return dict(
      image_to_image=round(ridge_accuracy(train_x, train_y, image_x, image_y, num_classes), 3),
      image_to_text=round(ridge_accuracy(train_x, train_y, text_x, text_y, num_classes), 3),
      image_to_text_centred=round(
          ridge_accuracy(train_x - train_x.mean(0), train_y, text_x - text_x.mean(0), text_y, num_classes), 3
      ),
  )


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from bench.condition_path import caption, views_of
  from iomm_jax import config_validation
  from iomm_jax.data import shapes
  from iomm_jax.models import iomm
  from iomm_jax.train import builder
  from iomm_jax.train.generate import image_condition, text_condition

  config = _CONFIG.value
  config_validation.validate(config)
  d = config.data
  run = builder.build(config)
  state = run.init_state()  # random, or config.init.workdir's weights (its EMA unless init.use_ema=False)
  params = state.ema_params if config.train.ema_decay > 0 else state.params
  tpl = run.templates
  render = max(int(d.resolution), int(d.vit_size))  # as the pipeline: render at the larger view, resize to both

  @jax.jit
  def condition(params, frozen, ids, valid, use_image, vit_pixels):
    gen = nnx.merge(run.statics.gen_def, params)
    mllm = nnx.merge(run.statics.mllm_def, frozen["mllm"])
    tokens = mllm.encode_image_tokens(vit_pixels) if vit_pixels is not None else None
    keep = jnp.ones((ids.shape[0], len(tpl.image_positions)), bool)  # unmasked, as at sampling
    h, _ = iomm.encode_condition(gen.rqa, mllm, tpl, ids, valid, tokens, keep, use_image, mode="query")
    return h.reshape(h.shape[0], -1)

  def of_images(images):
    _, vit = views_of(images, int(d.resolution), int(d.vit_size))
    out = []
    for i in range(0, len(vit), BATCH):
      v = jnp.asarray(vit[i : i + BATCH])
      out.append(np.asarray(condition(params, run.frozen, *image_condition(tpl, v.shape[0]), v)))
    return np.concatenate(out)

  def of_captions(labels):
    prompts = [caption(s, c) for s, c in labels]
    out = []
    for i in range(0, len(prompts), BATCH):
      ids, valid, use = text_condition(tpl, run.tokenize, prompts[i : i + BATCH])
      out.append(np.asarray(condition(params, run.frozen, ids, valid, use, None)))
    return np.concatenate(out)

  train_images, train_labels = shapes.single_object_set(_NUM_TRAIN.value, render, TRAIN_SEED)
  eval_images, eval_labels = shapes.single_object_set(_NUM_EVAL.value, render, EVAL_SEED)
  text_labels = np.asarray([(s, c) for s in range(len(shapes.SHAPES)) for c in range(len(shapes.COLOURS))], np.int32)
  h_train, h_eval, h_text = of_images(train_images), of_images(eval_images), of_captions(text_labels)
  result = dict(
      bench="condition_alignment",
      init=config.init.workdir or "random",
      mllm=config.model.mllm.path or "random",
      rqa_kind=config.model.rqa.kind,
  )
  for k, (attr, n) in enumerate((("shape", len(shapes.SHAPES)), ("colour", len(shapes.COLOURS)))):
    result[attr] = alignment(h_train, train_labels[:, k], h_eval, eval_labels[:, k], h_text, text_labels[:, k], n)
  result["chance"] = {"shape": round(1 / len(shapes.SHAPES), 3), "colour": round(1 / len(shapes.COLOURS), 3)}
  print(json.dumps(result))


if __name__ == "__main__":
  _define_flags()
  _common.absl_run(main, _CONFIG)
