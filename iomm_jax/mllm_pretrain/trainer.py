"""The tiny MLLM's training run: data in memory, the jitted step, held-out caption accuracy, the -hf folder."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iomm_jax.config import ConfigError
from iomm_jax.data import shapes
from iomm_jax.mllm_pretrain import caption_accuracy, examples, hf_folder, step, vision_pretrain
from iomm_jax.models.internvit import InternViTConfig
from iomm_jax.models.internvl import InternVL, InternVLConfig
from iomm_jax.models.processor import IM_END, Processor
from iomm_jax.models.qwen2 import Qwen2Config
from iomm_jax.train.time_budget import TimeBudget

# Fields of configs/tiny_mllm.py that count something: at least 1 (or 0 for the step counts: that phase is skipped).
_AT_LEAST_ONE = (
    "data.num_images",
    "data.eval_num",
    "data.max_len",
    "train.batch",
    "vision_pretrain.num_images",
    "vision_pretrain.eval_num",
    "vision_pretrain.batch",
)
_AT_LEAST_ZERO = ("train.num_steps", "vision_pretrain.num_steps")


CONFIG_SECTIONS = ("arch", "data", "vision_pretrain", "train")  # what an MLLM pre-training config has


def validate(config) -> None:
  """Raises ConfigError naming the first count field below its minimum or a learning rate that is not positive."""
  for names, low in ((_AT_LEAST_ONE, 1), (_AT_LEAST_ZERO, 0)):
    for name in names:
      section, field = name.split(".")
      value = config[section][field]
      if not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r}; it must be an integer >= {low}")
  if not config.train.time_budget_s >= 0:
    raise ConfigError(f"train.time_budget_s={config.train.time_budget_s!r}; it must be >= 0 (0: no budget)")
  for name in ("train.lr", "vision_pretrain.lr"):
    section, field = name.split(".")
    if not config[section][field] > 0:
      raise ConfigError(f"{name}={config[section][field]!r}; it must be > 0")
  if not 0.0 <= config.data.text_only_fraction <= 1.0:
    raise ConfigError(f"data.text_only_fraction={config.data.text_only_fraction!r}; it must be within [0, 1]")


def model_config(config) -> tuple[InternVLConfig, Processor]:
  """InternVLConfig (with LM head) from config.arch, its vocabulary and image-token id from the tiny tokenizer."""
  arch = config.arch.to_dict() if hasattr(config.arch, "to_dict") else dict(config.arch)
  try:  # the model configs check their own fields; a mistake there is the user's, so one line naming config.arch
    vision = InternViTConfig(**arch["vision"])
    grid = vision.image_size // vision.patch_size
    processor = Processor.tiny(num_image_tokens=(grid // 2) ** 2, image_size=vision.image_size)
    text = Qwen2Config(**dict(arch["text"], vocab_size=processor.vocab_size))
    cfg = InternVLConfig(vision=vision, text=text, image_token_id=processor.image_token_id, with_lm_head=True)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.arch: {e}") from None
  if cfg.num_image_tokens != processor.num_image_tokens:
    raise ConfigError(
        f"config.arch: {cfg.num_image_tokens} image tokens, the processor expects " f"{processor.num_image_tokens}"
    )
  return cfg, processor


def _weights_bytes(cfg: InternVLConfig) -> int:
  """The size of the model's fp32 weights, what model.safetensors holds at least (no array is allocated)."""
  abstract = nnx.eval_shape(lambda: InternVL(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def render_set(num: int, resolution: int, seed: int, processor: Processor) -> tuple[np.ndarray, list[str]]:
  """ViT inputs (num, S, S, 3) of shapes images rendered at `resolution`, and their captions."""
  pix, caps = [], []
  for i in range(num):
    img, cap = shapes.render(i, resolution, seed)
    pix.append(processor.preprocess_image(img))
    caps.append(cap)
  return np.stack(pix).astype(np.float32), caps


def caption_report(
    params,
    next_token,
    processor: Processor,
    builder: examples.SequenceBuilder,
    pixels,
    captions,
    *,
    batch: int = 128,
    instruction: str = examples.EVAL_INSTRUCTION,
) -> dict:
  """Greedy captions of held-out images, scored against the truth."""
  prompt = np.asarray(builder.caption_prompt(instruction), np.int32)
  end = processor.tokenizer.convert_tokens_to_ids(IM_END)
  predicted = []
  for i in range(0, len(captions), batch):
    px = jnp.asarray(pixels[i : i + batch])
    ids = np.repeat(prompt[None], px.shape[0], 0)
    for answer in step.greedy_decode(
        params, next_token, ids, px, max_len=builder.max_len, pad_id=processor.pad_id, end_id=end
    ):
      predicted.append(processor.tokenizer.decode(answer))
  out = caption_accuracy.score(predicted, captions)
  out["by_objects"] = {
      n: {k: s[k] for k in ("exact", "colour", "shape", "relation", "num_captions")}
      for n, s in caption_accuracy.score_by_objects(predicted, captions).items()
  }
  out["examples"] = [{"true": t, "predicted": p} for t, p in list(zip(captions, predicted))[:8]]
  return out


def pretrain(config, out: str) -> dict:
  """Train, evaluate and write the -hf folder at `out`; returns the report (also saved in the folder)."""
  t0 = time.time()
  validate(config)
  cfg, processor = model_config(config)
  hf_folder.check_replaceable(out, needs=_weights_bytes(cfg))  # minutes of training are not spent on a full disk
  builder = examples.SequenceBuilder(processor, config.data.max_len)
  d, t = config.data, config.train
  pixels, captions = render_set(d.num_images, d.resolution, d.seed, processor)
  eval_pixels, eval_captions = render_set(d.eval_num, d.resolution, d.eval_seed, processor)
  builder.check_fits(captions + eval_captions)  # before the ViT phase, not after it

  model = InternVL(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(config.seed))
  vision_report = None
  if config.vision_pretrain.num_steps > 0:
    vision_report = vision_pretrain.pretrain_vision(
        model.vision_tower, config.vision_pretrain, processor, seed=d.seed, eval_seed=d.eval_seed
    )
    print(json.dumps({"vision_pretrain": vision_report}), flush=True)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  optimizer = step.make_optimizer(t)
  opt_state = optimizer.init(params)
  train_step = step.make_train_step(graphdef, optimizer)
  next_token = step.make_next_token(graphdef)
  rng = np.random.default_rng(config.seed)
  budget = TimeBudget(t.time_budget_s)  # the captioning phase's clock, as the IOMM loop's: from its first step
  history, window, t_train, stopped_by, done = [], [], time.time(), "num_steps", 0
  for i in range(1, t.num_steps + 1):
    idx = rng.integers(0, d.num_images, size=t.batch)
    b = examples.make_batch(builder, pixels[idx], [captions[j] for j in idx], rng, d.text_only_fraction)
    params, opt_state, metrics = train_step(
        params, opt_state, jnp.asarray(b.ids), jnp.asarray(b.valid), jnp.asarray(b.loss_mask), jnp.asarray(b.pixels)
    )
    window.append(metrics)
    done = i
    last = i == t.num_steps or budget.spent(i)
    if i % t.log_every == 0 or last:
      m = {k: float(np.mean([float(w[k]) for w in window])) for k in window[0]}
      window = []
      history.append({"step": i, **m})
      print(json.dumps({"step": i, **{k: round(v, 4) for k, v in m.items()}}), flush=True)
    if last:
      stopped_by = "num_steps" if i == t.num_steps else "time_budget"
      break
  train_s = time.time() - t_train
  report = {
      "vision_pretrain": vision_report,
      "steps": done,
      "stopped_by": stopped_by,
      "batch": t.batch,
      "train_seconds": round(train_s, 1),
      "history": history,
      "heldout": caption_report(params, next_token, processor, builder, eval_pixels, eval_captions),
      "heldout_aux_prompt": caption_report(
          params, next_token, processor, builder, eval_pixels, eval_captions, instruction=processor.aux_prompt
      ),
      "chance": caption_accuracy.chance_levels(),
      "config": json.loads(config.to_json_best_effort()),
  }
  report["heldout_aux_prompt"].pop("examples")
  hf_folder.write(out, cfg, params, processor.tokenizer, report)
  report["total_seconds"] = round(time.time() - t0, 1)
  keys = ("vision_pretrain", "steps", "stopped_by", "train_seconds", "total_seconds", "heldout", "heldout_aux_prompt")
  keys += ("chance",)
  return {k: report[k] for k in keys}
