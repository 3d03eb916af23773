"""Numerical check of our InternVL against transformers on the same checkpoint directory.

Used by `python -m iomm_jax.convert verify --component mllm --src DIR`. torch and transformers are imported here
only (tests/converter dependency, not training).
"""

from __future__ import annotations

import numpy as np
from iomm_jax.weights.load_internvl import load_internvl

# The outputs compared, each a key of verify_mllm's report: the LLM on text alone, on an image prompt, the projector.
MLLM_PARTS = ("text_only", "image_text", "projector")


def _diffs(ours: np.ndarray, theirs: np.ndarray) -> dict:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  max_abs = float(np.max(np.abs(ours - theirs)))
  scale = max(1.0, float(np.max(np.abs(theirs))))
  return {"max_abs_diff": max_abs, "max_rel_diff": max_abs / scale, "scale": scale}


def verify_mllm(src_dir, *, seed: int = 0, atol_rel: float = 1e-4, text_len: int = 12, batch: int = 2) -> dict:
  """Build transformers' InternVLForConditionalGeneration and our InternVL (fp32) from `src_dir`, run a
  text-only and an image+text input, and compare last hidden states and projector outputs.

  Returns {'text_only': {...}, 'image_text': {...}, 'projector': {...}, 'passed': bool, 'atol_rel': float}; each
  entry has max_abs_diff, max_rel_diff (= max_abs / max(1, max|theirs|)) and scale.
  """
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx
  from transformers import InternVLForConditionalGeneration

  ours = load_internvl(src_dir, dtype=jnp.float32)
  cfg = ours.cfg
  theirs = InternVLForConditionalGeneration.from_pretrained(
      str(src_dir), dtype=torch.float32, attn_implementation="eager"
  ).model.eval()

  rng = np.random.default_rng(seed)
  vocab = [i for i in range(min(cfg.text.vocab_size, 50_000)) if i != cfg.image_token_id]
  text_ids = rng.choice(vocab, size=(batch, text_len)).astype(np.int64)
  n_img = cfg.num_image_tokens
  half = text_len // 2
  image_ids = np.concatenate(
      [text_ids[:, :half], np.full((batch, n_img), cfg.image_token_id, np.int64), text_ids[:, half:]], axis=1
  )
  size = cfg.vision.image_size
  pixels = rng.standard_normal((batch, size, size, cfg.vision.num_channels)).astype(np.float32)

  with torch.no_grad():
    t_text = theirs(input_ids=torch.from_numpy(text_ids)).last_hidden_state.numpy()
    out = theirs(input_ids=torch.from_numpy(image_ids), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    t_image, t_proj = out.last_hidden_state.numpy(), out.image_outputs.pooler_output.numpy()

  graphdef, state = nnx.split(ours)

  @jax.jit
  def run(state, text_ids, image_ids, pixels):
    m = nnx.merge(graphdef, state)
    proj = m.encode_image_tokens(pixels)
    image_h = m.language_model_forward(m.splice_image_tokens(m.embed_tokens(image_ids), image_ids, proj))
    return m(text_ids), proj, image_h

  with jax.default_matmul_precision("highest"):
    o_text, o_proj, o_image = (np.asarray(x) for x in run(state, text_ids, image_ids, pixels))

  report = {
      **dict(zip(MLLM_PARTS, (_diffs(o_text, t_text), _diffs(o_image, t_image), _diffs(o_proj, t_proj)))),
      "atol_rel": atol_rel,
  }
  report["passed"] = all(report[k]["max_rel_diff"] <= atol_rel for k in MLLM_PARTS)
  return report
