"""The generator with a perfect condition: can the configured DiT draw a *named* shape within a step budget?

  python bench/oracle_condition.py --config=configs/tiny.py [--steps=1800] [--eval_every=600] [--num=84]
      [--grid=oracle.png]

IOMM's generator reads the frozen MLLM through the Residual Query Adapter. This bench removes both: the condition
is two learned tokens, the object's shape and its colour, a condition that understands the image perfectly. The
DiT, its prediction target, loss space, optimizer, EMA, condition dropout and sampler are the config's own (the
real ``Generator.velocity``), and the images are the shapes world's single-object scenes. So what it measures is an
upper bound on what any MLLM, however good, can give that DiT in that many updates: if the samples do not follow
the shape here, a better MLLM cannot make them. Scored by the mini-GenEval detector (``shapes_detector``): the
largest object's shape and colour against the condition, and the fraction with exactly one object.

Prints ONE JSON line: {"bench": "oracle_condition", "s_per_step", "curve": [{"step", "shape", "colour",
"one_object"}, ...], "chance_shape", "chance_colour", ...}.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench import _common  # noqa: E402


def score(images, labels) -> dict:
  """Detector scores of uint8 images against their (shape, colour) indices: the largest detected object's shape and
  colour, and the fraction of images with exactly one object (an image with none fails all three)."""
  from iomm_jax import shapes_detector
  from iomm_jax.data import shapes

  colours = list(shapes.COLOURS)
  det = shapes_detector.get(int(images.shape[1]))
  shape_ok = colour_ok = one = 0
  for img, (s, c) in zip(images, labels):
    found = det.detect(img)
    if found:
      shape_ok += found[0].shape == shapes.SHAPES[s]
      colour_ok += found[0].colour == colours[c]
      one += len(found) == 1
  n = len(images)
  return dict(shape=round(shape_ok / n, 3), colour=round(colour_ok / n, 3), one_object=round(one / n, 3))


def _define_flags():
  """The command line, defined only when run as a script: importing this module (its tests do) defines no absl flag
  that could collide with another module's in the same process."""
  global _CONFIG, _STEPS, _EVAL_EVERY, _NUM, _IMAGES, _GRID
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg] (its DiT, training and sampler)")
  _STEPS = flags.DEFINE_integer("steps", 0, "training steps (0 = config.train.num_steps)", lower_bound=0)
  _EVAL_EVERY = flags.DEFINE_integer(
      "eval_every", 600, "score the EMA weights every this many steps (and at the end)", lower_bound=1
  )
  _NUM = flags.DEFINE_integer("num", 84, "samples per score: the 6 × 7 (shape, colour) pairs in turn", lower_bound=1)
  _IMAGES = flags.DEFINE_integer("images", 4096, "single-object training images (rendered once)", lower_bound=1)
  _GRID = flags.DEFINE_string("grid", "", "write the last score's samples as a PNG grid here")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from iomm_jax import config_validation, output_folder
  from iomm_jax.data import decode, shapes
  from iomm_jax.models import factory
  from iomm_jax.sampling import euler, guided
  from iomm_jax.train import loss as loss_lib
  from iomm_jax.train import optimizers
  from iomm_jax.train.generate import to_uint8

  config = _CONFIG.value
  config_validation.validate(config, needs_data=False)  # it reads no dataset: it renders its own scenes
  problem = _GRID.value and output_folder.path_problem(_GRID.value, folder=False)
  if problem:  # before the training, not after it
    raise SystemExit(f"--grid: {problem}")
  t = config.train
  steps = _STEPS.value or int(t.num_steps)
  res, batch = int(config.data.resolution), int(t.global_batch)
  n_shapes, n_colours = len(shapes.SHAPES), len(shapes.COLOURS)

  rngs = nnx.Rngs(config.seed)
  gen = factory.make_generator(config, rngs)
  width = gen.rqa.cfg.dim
  ae = factory.make_ae(config, rngs)
  # Token 0 is the dropped condition (CFG's unconditional branch); then the shapes, then the colours.
  table = nnx.Embed(1 + n_shapes + n_colours, width, rngs=rngs)

  def tokens(labels):  # (shape, colour) indices → the condition's two token ids
    return jnp.asarray(np.stack([1 + labels[:, 0], 1 + n_shapes + labels[:, 1]], axis=1))

  images, labels = shapes.single_object_set(_IMAGES.value, res, config.seed)
  x_all = ae.encode(jnp.asarray(decode.to_signed_unit(images)))
  cond_all = tokens(labels)

  def velocity(gen, table, x_t, tt, cond):
    h = table(cond)
    return gen.velocity(x_t, tt, h, jnp.ones(cond.shape, bool))

  params = nnx.state((gen, table), nnx.Param)
  graph = nnx.graphdef((gen, table))
  opt = optimizers.make_optimizer(t, total_steps=steps)
  opt_state = opt.init(params)
  ema = params
  t_kwargs, loss_kwargs = loss_lib.t_options(t), loss_lib.loss_options(config)

  @jax.jit
  def train_step(params, opt_state, ema, key):
    k_idx, k_drop, k_loss = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (batch,), 0, x_all.shape[0])
    cond = jnp.where(jax.random.uniform(k_drop, (batch, 1)) < t.p_uncond, 0, cond_all[idx])

    def loss_fn(p):
      g, tab = nnx.merge(graph, p)
      return loss_lib.flow_matching_loss(
          lambda x_t, tt: velocity(g, tab, x_t, tt, cond), x_all[idx], k_loss, t_kwargs=t_kwargs, **loss_kwargs
      )[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, optimizers.ema_update(ema, params, t.ema_decay) if t.ema_decay > 0 else params, loss

  eval_labels = np.asarray([(i % n_shapes, (i // n_shapes) % n_colours) for i in range(_NUM.value)], np.int32)
  eval_cond = tokens(eval_labels)
  noise = jax.random.normal(jax.random.key(config.seed + 1), (_NUM.value,) + x_all.shape[1:], jnp.float32)

  @jax.jit
  def draw(p):
    g, tab = nnx.merge(graph, p)
    both = jnp.concatenate([eval_cond, jnp.zeros_like(eval_cond)])
    fn = guided(lambda x, tt: velocity(g, tab, x, tt, both), config.sample.cfg_scale)
    return ae.decode(euler(fn, noise, config.sample.steps))

  curve, train_s, key = [], 0.0, jax.random.key(config.seed)
  for i in range(steps):
    key, k = jax.random.split(key)
    start = time.perf_counter()
    params, opt_state, ema, loss = train_step(params, opt_state, ema, k)
    if i > 0:  # the first step is compilation
      loss.block_until_ready()
      train_s += time.perf_counter() - start
    if (i + 1) % _EVAL_EVERY.value == 0 or i + 1 == steps:
      samples = to_uint8(draw(ema))
      curve.append(dict(step=i + 1, loss=round(float(loss), 4), **score(samples, eval_labels)))
      print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
  if _GRID.value:
    from PIL import Image

    cols = n_shapes
    rows = len(samples) // cols
    grid = samples[: rows * cols].reshape(rows, cols, res, res, 3).transpose(0, 2, 1, 3, 4)
    Image.fromarray(grid.reshape(rows * res, cols * res, 3)).save(_GRID.value)
  print(
      json.dumps(
          dict(
              bench="oracle_condition",
              config=config_flags.get_config_filename(flags.FLAGS["config"]),
              steps=steps,
              global_batch=batch,
              s_per_step=round(train_s / max(1, steps - 1), 4),
              cfg_scale=config.sample.cfg_scale,
              curve=curve,
              chance_shape=round(1 / n_shapes, 3),
              chance_colour=round(1 / n_colours, 3),
          )
      )
  )


if __name__ == "__main__":
  _define_flags()
  _common.absl_run(main, _CONFIG)
