"""The tiny MLLM's vision tower, pre-trained on its own before captioning: a classifier of the object's form.

InternVL never teaches its vision encoder to see through captions alone: InternViT is pre-trained first, and the
MLLM stages start from it. The tiny world's ViT needs the same, for a reason measured on this world: trained from
scratch through 600 steps of captioning, its features carry no more shape than a random ViT's (a linear probe,
``bench/mllm_vision_probe.py``) and the MLLM names the shape of a single object at chance (3x the steps: held-out
shape 0.32 over all scenes, against 0.26). Every objective
tried in which an easier feature can be predicted too (contrastive image-caption, with shape-swapped hard negatives,
caption words as labels, dense per-patch shape and colour labels, colour-and-shape classes; dense shape labels alone,
where object against background is the easy part) learned that feature within a few hundred steps and stalled on
shape: the easy feature starves the hard one. A classifier of the shape alone, on single-object scenes,
learns it in a few hundred steps, and the captioning that follows keeps it.

So the first phase here trains ViT + a mean-pool linear head (discarded afterwards) to name the object of
single-object scenes of the MLLM's own training draw; the captioning phase then trains the whole MLLM from it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iomm_jax.data import shapes
from iomm_jax.mllm_pretrain import step
from iomm_jax.models.internvit import InternViT
from iomm_jax.models.processor import Processor


class ShapeClassifier(nnx.Module):
  """The vision tower with a linear head on its mean patch token: logits over ``shapes.SHAPES``."""

  def __init__(self, vision_tower: InternViT, *, rngs: nnx.Rngs):
    self.vision_tower = vision_tower
    self.head = nnx.Linear(vision_tower.cfg.hidden_size, len(shapes.SHAPES), rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    return self.head(self.vision_tower(pixels)[:, 1:].mean(axis=1))


def shape_set(num: int, seed: int, processor: Processor) -> tuple[np.ndarray, np.ndarray]:
  """ViT inputs (num, S, S, 3) of single-object scenes rendered at the ViT size, and their shape indices."""
  images, labels = shapes.single_object_set(num, processor.image_size, seed)
  pixels = np.stack([processor.preprocess_image(img) for img in images]).astype(np.float32)
  return pixels, labels[:, 0]


def pretrain_vision(vision_tower: InternViT, vcfg, processor: Processor, *, seed: int, eval_seed: int) -> dict:
  """Train `vision_tower` in place as a shape classifier for vcfg.num_steps; returns its report (held-out accuracy
  on vcfg.eval_num single-object scenes of the world draw `eval_seed`, against chance)."""
  t0 = time.time()
  pixels, labels = shape_set(vcfg.num_images, seed, processor)
  eval_pixels, eval_labels = shape_set(vcfg.eval_num, eval_seed, processor)
  model = ShapeClassifier(vision_tower, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  optimizer = step.make_optimizer(vcfg)
  opt_state = optimizer.init(params)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, x):
    return jnp.argmax(nnx.merge(graphdef, params)(x), axis=-1)

  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(vcfg.num_steps):
    idx = rng.integers(0, len(labels), size=vcfg.batch)
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(pixels[idx]), jnp.asarray(labels[idx]))
    losses.append(loss)
  nnx.update(model, params)  # the vision tower (shared with the MLLM) now holds the trained weights
  predicted = np.concatenate(
      [np.asarray(predict(params, jnp.asarray(eval_pixels[i : i + 128]))) for i in range(0, len(eval_labels), 128)]
  )
  tail = [float(x) for x in losses[-max(1, len(losses) // 10) :]]
  return {
      "steps": int(vcfg.num_steps),
      "seconds": round(time.time() - t0, 1),
      "final_loss": round(float(np.mean(tail)), 4) if losses else None,
      "heldout_shape_accuracy": round(float(np.mean(predicted == eval_labels)), 4),
      "chance": round(1 / len(shapes.SHAPES), 4),
      "num_eval": int(len(eval_labels)),
  }
