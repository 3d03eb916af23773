"""Prompt template, tiny tokenizer and image preprocessing of the MLLM processor."""

import json

import numpy as np
import pytest

from iomm_jax.models import internvl_keys
from iomm_jax.models.internvl import InternVLConfig
from iomm_jax.models.processor import (DEFAULT_AUX_PROMPT, IMAGENET_MEAN, IMAGENET_STD, Processor, chat_template)


@pytest.fixture(scope="module")
def tiny():
  return Processor.tiny(num_image_tokens=4, image_size=28)


def _tokens(proc, ids):
  return proc.tokenizer.convert_ids_to_tokens(ids)


def test_image_prompt_layout(tiny):
  ids = tiny.image_prompt_ids(DEFAULT_AUX_PROMPT)
  assert ids == tiny.image_prompt_ids()  # None = the default aux prompt
  toks = _tokens(tiny, ids)
  words = "generate an image that is identical to the reference image :".split()
  assert toks == (
      [
          "<|im_start|>",
          "user",
          "\n",
          *words,
          "<img>",
          *["<IMG_CONTEXT>"] * 4,
          "</img>",
          "<|im_end|>",
          "\n",
          "<|im_start|>",
          "assistant",
          "\n",
      ]
  )
  assert ids.count(tiny.image_token_id) == 4 and tiny.tokenizer.unk_token_id not in ids


def test_text_prompt_and_unknown_words(tiny):
  empty = _tokens(tiny, tiny.text_prompt_ids(""))
  assert empty == ["<|im_start|>", "user", "\n", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
  ids = tiny.text_prompt_ids("A Red circle above the BLUE zorblax.")
  toks = _tokens(tiny, ids)
  assert toks[3:11] == ["a", "red", "circle", "above", "the", "blue", "<unk>", "."]
  assert tiny.image_token_id not in ids
  assert tiny.pad_id == tiny.tokenizer.convert_tokens_to_ids("<pad>")
  assert tiny.vocab_size == len(tiny.tokenizer) < 200


def test_preprocess_image(tiny):
  img = np.full((40, 60, 3), 128, np.uint8)
  x = tiny.preprocess_image(img)
  assert x.shape == (28, 28, 3) and x.dtype == np.float32
  expected = (128 / 255 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
  np.testing.assert_allclose(x, np.broadcast_to(expected, x.shape), atol=1e-5)
  ramp = np.tile(np.arange(28, dtype=np.uint8)[None, :, None] * 9, (28, 1, 3))
  np.testing.assert_allclose(
      tiny.preprocess_image(ramp)[0, :, 0], (ramp[0, :, 0] / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], atol=1e-5
  )
  assert tiny.preprocess_image(np.zeros((28, 28), np.uint8)).shape == (28, 28, 3)
  with pytest.raises(ValueError, match="uint8"):
    tiny.preprocess_image(np.zeros((28, 28, 3), np.float32))


def test_from_pretrained_offline(tiny, tmp_path):
  tiny.tokenizer.save_pretrained(tmp_path)
  cfg = InternVLConfig()
  (tmp_path / "config.json").write_text(json.dumps(internvl_keys.config_to_torch(cfg)))
  proc = Processor.from_pretrained(tmp_path)
  assert proc.num_image_tokens == 256 and proc.image_size == 448
  assert proc.text_prompt_ids("red square") == tiny.text_prompt_ids("red square")
  assert proc.image_prompt_ids().count(proc.image_token_id) == 256
  with pytest.raises(FileNotFoundError, match="InternVL3-2B-hf"):
    Processor.from_pretrained(tmp_path / "missing")


def test_template_string():
  assert chat_template("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
