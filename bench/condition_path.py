"""The generator through IOMM's own condition path: how fast does the DiT learn a named shape from the frozen MLLM?

  python bench/condition_path.py --config=configs/tiny.py --config.model.mllm.path=DIR --path=caption|image
      [--steps=6000] [--eval_every=2000] [--num=168] [--config.train.repa_weight=0.5]

The companion of ``oracle_condition.py``, on the same task (single-object scenes of the shapes world) and with the
same score (the mini-GenEval detector: the largest object's shape and colour, and exactly one object), but the
condition is the real one: the frozen MLLM's hidden states read by the Residual Query Adapter, trained with the
real training step (``train/step.py``: the config's mask ratio, condition dropout, loss, optimizer, EMA, REPA).

  --path=caption  every training image is captioned ("a red circle"); scored on text prompts, the 6 × 7 (shape,
                  colour) captions in turn — the route a text prompt takes after stage 2.
  --path=image    image-only training, as stage 1 (the config's mask ratio); scored on samples conditioned on
                  unmasked held-out images (another seed of the world) against those images' shape and colour.

Side by side with ``oracle_condition.py`` at the same steps, the gap is what the MLLM → adapter path costs.

Prints ONE JSON line: {"bench": "condition_path", "path", "steps", "s_per_step", "curve": [{"step", "loss", "shape",
"colour", "one_object"}, ...], "chance_shape", "chance_colour", ...}.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench import _common  # noqa: E402

PATHS = ("caption", "image")
EVAL_SEED_OFFSET = 12345  # the image path's held-out scenes: another seed of the world than training's


def _define_flags():
  """The command line, defined only when run as a script (see oracle_condition._define_flags)."""
  global _CONFIG, _PATH, _STEPS, _EVAL_EVERY, _NUM, _IMAGES
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg] (MLLM, adapter, DiT, training)")
  _PATH = flags.DEFINE_enum("path", "caption", PATHS, "the condition: captions through the MLLM, or masked images")
  _STEPS = flags.DEFINE_integer("steps", 0, "training steps (0 = config.train.num_steps)", lower_bound=0)
  _EVAL_EVERY = flags.DEFINE_integer(
      "eval_every", 2000, "score the EMA weights every this many steps (and at the end)", lower_bound=1
  )
  _NUM = flags.DEFINE_integer("num", 168, "samples per score", lower_bound=1)
  _IMAGES = flags.DEFINE_integer("images", 4096, "single-object training images (rendered once)", lower_bound=1)


def views_of(images, resolution: int, vit_size: int):
  """uint8 renders (N, R, R, 3) → the training step's two views: pixels (N, res, res, 3) in [-1, 1] and ImageNet-
  normalised ViT pixels (N, vit, vit, 3), through the data pipeline's one preprocessing path (``decode.views``)."""
  import numpy as np
  from PIL import Image

  from iomm_jax.data import decode

  pairs = [decode.views(Image.fromarray(img), resolution, vit_size) for img in images]
  return np.stack([p for p, _ in pairs]), np.stack([v for _, v in pairs])


def caption_arrays(tokenize, labels, max_len: int):
  """(caption_ids (N, max_len) int32, caption_len (N,) int32) of the single-object captions of (shape, colour)."""
  import numpy as np

  ids = np.zeros((len(labels), max_len), np.int32)
  lens = np.zeros((len(labels),), np.int32)
  for i, (s, c) in enumerate(labels):
    t = tokenize(caption(s, c))
    ids[i, : len(t)], lens[i] = t, len(t)
  return ids, lens


def caption(shape: int, colour: int) -> str:
  """The world's caption of one object, from (shape, colour) indices."""
  from iomm_jax.data import shapes

  return shapes.caption_of([dict(shape=shapes.SHAPES[shape], colour=list(shapes.COLOURS)[colour])])


def main(argv):
  del argv
  import jax
  import numpy as np

  from bench.oracle_condition import score
  from iomm_jax import config_validation
  from iomm_jax.data import shapes
  from iomm_jax.train import builder
  from iomm_jax.train.generate import generate, to_uint8

  config = _CONFIG.value
  config_validation.validate(config)
  steps = _STEPS.value or int(config.train.num_steps)
  path, num = _PATH.value, _NUM.value
  d, batch = config.data, int(config.train.global_batch)
  render = max(int(d.resolution), int(d.vit_size))  # as the pipeline: render at the larger view, resize to both
  seed = int(d.shapes_seed)

  images, labels = shapes.single_object_set(_IMAGES.value, render, seed)
  pixels, vit_pixels = views_of(images, int(d.resolution), int(d.vit_size))
  run = builder.build(config).with_num_steps(steps)
  cap_ids, cap_len = caption_arrays(run.tokenize, labels, int(d.max_text_tokens))
  image_only = np.full((batch,), path == "image")

  if path == "caption":
    eval_labels = np.asarray([(i % 6, (i // 6) % 7) for i in range(num)], np.int32)
    prompts = [caption(s, c) for s, c in eval_labels]
  else:
    held_out, eval_labels = shapes.single_object_set(num, render, seed + EVAL_SEED_OFFSET)
    _, eval_vit = views_of(held_out, int(d.resolution), int(d.vit_size))

  def draw(params):
    rng = jax.random.key(config.seed + 1)
    if path == "caption":
      return to_uint8(generate(run, params, prompts=prompts, rng=rng))
    return to_uint8(generate(run, params, vit_pixels=eval_vit, rng=rng))

  state = run.init_state()
  order = np.random.default_rng(config.seed)
  curve, train_s = [], 0.0
  for i in range(steps):
    idx = order.integers(0, len(labels), batch)
    b = dict(
        pixels=pixels[idx],
        vit_pixels=vit_pixels[idx],
        caption_ids=cap_ids[idx],
        caption_len=cap_len[idx],
        is_image_only=image_only,
    )
    start = time.perf_counter()
    state, metrics = run.train_step(state, run.frozen, b)
    if i > 0:  # the first step is compilation
      jax.block_until_ready(metrics["loss"])
      train_s += time.perf_counter() - start
    if (i + 1) % _EVAL_EVERY.value == 0 or i + 1 == steps:
      params = state.ema_params if config.train.ema_decay > 0 else state.params
      point = dict(step=i + 1, loss=round(float(metrics["loss"]), 4), **score(draw(params), eval_labels))
      if "repa" in metrics:
        point["repa"] = round(float(metrics["repa"]), 4)
      curve.append(point)
      print(json.dumps(point), file=sys.stderr, flush=True)
  print(
      json.dumps(
          dict(
              bench="condition_path",
              path=path,
              config=config_flags.get_config_filename(flags.FLAGS["config"]),
              mllm=config.model.mllm.path or "random",
              steps=steps,
              global_batch=batch,
              mask_ratio=config.train.mask_ratio,
              repa_weight=config.train.repa_weight,
              s_per_step=round(train_s / max(1, steps - 1), 4),
              cfg_scale=config.sample.cfg_scale,
              curve=curve,
              chance_shape=round(1 / len(shapes.SHAPES), 3),
              chance_colour=round(1 / len(shapes.COLOURS), 3),
          )
      )
  )


if __name__ == "__main__":
  _define_flags()
  _common.absl_run(main, _CONFIG)
