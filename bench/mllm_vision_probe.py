"""Does a (tiny) MLLM's vision side see shape? A linear probe on its frozen features, against a random ViT.

  python bench/mllm_vision_probe.py --mllm=runs/tiny_mllm [--num_train=1400] [--num_eval=300]

IOMM's generator can only draw what the frozen MLLM's hidden states carry. This bench asks the first half of that
question for the shapes world: single-object scenes are rendered at the ViT's input size, and a closed-form ridge
probe (one-hot targets, the same regulariser for every feature set) is fitted on held-in images and scored on
held-out ones, for the object's shape and its colour, from
  - ``vit_mean``: the last ViT layer, mean over patch tokens (what a classifier head would read);
  - ``image_tokens``: the projected image tokens the LLM reads, flattened (position kept).
Each is also measured on a randomly initialised model of the same configuration: a trained vision side that
probes no better than the random one has not learned that attribute, whatever its captions say.

Prints ONE JSON line: {"bench": "mllm_vision_probe", "trained": {"vit_mean": {"shape", "colour"}, ...},
"random": {...}, "chance": {"shape", "colour"}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import _common  # noqa: E402
from iomm_jax.data import shapes  # noqa: E402
from iomm_jax.models.internvl import InternVL  # noqa: E402
from iomm_jax.models.internvl_keys import read_config  # noqa: E402
from iomm_jax.models.processor import Processor  # noqa: E402
from iomm_jax.weights.load_internvl import load_internvl  # noqa: E402

RIDGE = 1.0  # the ridge penalty, relative to the mean feature variance (features are standardised first)


def features(model: InternVL, pixels: np.ndarray, batch: int = 128) -> dict[str, np.ndarray]:
  """{'vit_mean': (N, D_vit), 'image_tokens': (N, N_img·D_text)} of preprocessed pixels."""

  @jax.jit
  def f(x):
    vit = model.vision_tower(x)[:, 1:].mean(1)
    tokens = model.encode_image_tokens(x)
    return vit, tokens.reshape(x.shape[0], -1)

  parts = [f(jnp.asarray(pixels[i : i + batch])) for i in range(0, len(pixels), batch)]
  return {
      "vit_mean": np.concatenate([np.asarray(p[0], np.float64) for p in parts]),
      "image_tokens": np.concatenate([np.asarray(p[1], np.float64) for p in parts]),
  }


def ridge_accuracy(train_x, train_y, eval_x, eval_y, num_classes: int, ridge: float = RIDGE) -> float:
  """Held-out accuracy of a ridge regression onto one-hot labels (argmax decides), features standardised on the
  training set; solved in the dual when there are more features than images."""
  mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
  a, b = (train_x - mu) / sd, (eval_x - mu) / sd
  y = np.eye(num_classes)[train_y]
  lam = ridge * a.shape[0]
  if a.shape[1] <= a.shape[0]:
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y)
  else:
    w = a.T @ np.linalg.solve(a @ a.T + lam * np.eye(a.shape[0]), y)
  return float(np.mean(np.argmax(b @ w, 1) == eval_y))


def probe(model: InternVL, processor: Processor, train, held) -> dict:
  """{feature set: {'shape': acc, 'colour': acc}} of one model."""
  prep = lambda imgs: np.stack([processor.preprocess_image(i) for i in imgs]).astype(np.float32)
  f_train, f_held = features(model, prep(train[0])), features(model, prep(held[0]))
  out = {}
  for name in f_train:
    out[name] = {
        attr: round(
            ridge_accuracy(f_train[name], train[1][:, k], f_held[name], held[1][:, k], n),
            3,
        )
        for k, (attr, n) in enumerate((("shape", len(shapes.SHAPES)), ("colour", len(shapes.COLOURS))))
    }
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--mllm", required=True, help="an InternVL -hf folder (e.g. pretrain_mllm's --out)")
  p.add_argument("--num_train", type=_common.count(), default=1400, help="single-object scenes the probe is fitted on")
  p.add_argument("--num_eval", type=_common.count(), default=300, help="held-out single-object scenes it is scored on")
  p.add_argument("--seed", type=int, default=0, help="init seed of the random baseline")
  args = p.parse_args(argv)

  cfg = read_config(args.mllm)
  processor = Processor.from_pretrained(args.mllm)
  size = cfg.vision.image_size
  train = shapes.single_object_set(
      args.num_train, size, seed=11
  )  # world draws no training run uses (1, 2: MLLM; 0: IOMM)
  held = shapes.single_object_set(args.num_eval, size, seed=12)
  trained = load_internvl(args.mllm, dtype=jnp.float32)
  random = InternVL(read_config(args.mllm), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
  result = {
      "bench": "mllm_vision_probe",
      "mllm": args.mllm,
      "num_train": args.num_train,
      "num_eval": args.num_eval,
      "trained": probe(trained, processor, train, held),
      "random": probe(random, processor, train, held),
      "chance": {"shape": round(1 / len(shapes.SHAPES), 3), "colour": round(1 / len(shapes.COLOURS), 3)},
  }
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(_common.run(main))
