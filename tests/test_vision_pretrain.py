"""The tiny MLLM's vision pre-training: the ViT handed to captioning sees shape (a linear probe says so, against a
random ViT), a 0-step phase leaves it alone; the captioning phase's time budget; bad values fail in one line naming
the field."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT, load_config, run_app

sys.path.insert(0, ROOT)
from bench import mllm_vision_probe  # noqa: E402
from iomm_jax.data import shapes  # noqa: E402
from iomm_jax.mllm_pretrain import trainer, vision_pretrain  # noqa: E402
from iomm_jax.models.internvl import InternVL  # noqa: E402


def _model(seed=0):
  c = load_config("tiny_mllm", "short")
  cfg, processor = trainer.model_config(c)
  return c, InternVL(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed)), processor


def _shape_probe(model, processor) -> float:
  """Held-out ridge-probe accuracy of shape from the mean ViT token (bench/mllm_vision_probe.py's measure)."""
  train = shapes.single_object_set(400, processor.image_size, seed=11)
  held = shapes.single_object_set(150, processor.image_size, seed=12)
  return mllm_vision_probe.probe(model, processor, train, held)["vit_mean"]["shape"]


def test_pretrained_vision_tower_sees_shape_and_random_does_not():
  c, model, processor = _model()
  c.unlock()
  c.vision_pretrain.num_steps, c.vision_pretrain.num_images, c.vision_pretrain.eval_num = 250, 512, 128
  before = _shape_probe(model, processor)
  report = vision_pretrain.pretrain_vision(model.vision_tower, c.vision_pretrain, processor, seed=1, eval_seed=2)
  after = _shape_probe(model, processor)
  # 250 steps name the shape of held-out single objects far above chance (1/6), and the tower the MLLM keeps (not
  # only the discarded head) carries it: its frozen features probe well above the random tower's.
  assert report["steps"] == 250 and report["heldout_shape_accuracy"] > 0.4, report
  assert after > before + 0.15, (before, after)


def test_zero_steps_leave_the_tower_untouched():
  c, model, processor = _model()
  c.unlock()
  c.vision_pretrain.num_steps, c.vision_pretrain.num_images, c.vision_pretrain.eval_num = 0, 32, 16
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.vision_tower)))
  report = vision_pretrain.pretrain_vision(model.vision_tower, c.vision_pretrain, processor, seed=1, eval_seed=2)
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.vision_tower)))
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
  assert report["steps"] == 0 and report["final_loss"] is None


@pytest.mark.parametrize(
    "override, field",
    [
        ("vision_pretrain.num_images=0", "vision_pretrain.num_images"),
        ("train.lr=0.0", "train.lr"),
        ("train.time_budget_s=-1.0", "train.time_budget_s"),
    ],
)
def test_bad_counts_fail_in_one_line_naming_the_field(tmp_path, override, field):
  r = run_app(
      "iomm_jax.pretrain_mllm", "--config=configs/tiny_mllm.py:short", f"--out={tmp_path / 'm'}", f"--config.{override}"
  )
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert f"config error: {field}=" in r.stderr
  assert not (tmp_path / "m").exists()  # nothing written


@pytest.mark.slow
def test_time_budget_ends_captioning_early_and_still_saves(tmp_path):
  c = load_config("tiny_mllm", "short")
  c.unlock()
  c.vision_pretrain.num_steps, c.train.time_budget_s = 5, 1e-9  # spent before the first captioning step ends
  report = trainer.pretrain(c, str(tmp_path / "m"))
  assert report["steps"] == 1 and report["stopped_by"] == "time_budget", report
  assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "mllm_pretrain.json").is_file()
  c.train.time_budget_s = 0.0  # no budget: the configured steps
  full = trainer.pretrain(c, str(tmp_path / "n"))
  assert full["steps"] == c.train.num_steps and full["stopped_by"] == "num_steps"
