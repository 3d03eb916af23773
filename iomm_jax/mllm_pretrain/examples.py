"""Training sequences for the tiny MLLM, built the way InternVL is trained: chat turns with a next-token loss on the
answer.

Two kinds of turn (one user turn, one assistant turn, the InternVL/Qwen2 chat template of models/processor.py):
  captioning  user: {instruction}<img> N×<IMG_CONTEXT> </img>  → assistant: {plain caption}<|im_end|>
  text-only   user: {caption}                                  → assistant: {plain caption}<|im_end|>
The world's captions come in several phrasings ("a photo of an orange circle left of …"); the assistant always
answers in the plain grammar (data/shapes.canonical_caption), so the model learns that the phrasings mean one
thing, and its answers carry no guess at the phrasing. The loss covers the assistant turn, and for text-only turns
the user's caption too, so the language side models captions. One captioning instruction is IOMM's own aux prompt,
so the frozen model's hidden states after IOMM's image template are the ones that learned to say what the image
shows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from iomm_jax.config import ConfigError
from iomm_jax.data import shapes
from iomm_jax.models.processor import (
    DEFAULT_AUX_PROMPT,
    IM_END,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    Processor,
    chat_template,
)

# Instructions placed before the image in captioning turns ('' = the image alone).
INSTRUCTIONS = (DEFAULT_AUX_PROMPT, "describe the image .", "what is in this image ?", "")
EVAL_INSTRUCTION = "describe the image ."


@dataclasses.dataclass
class Batch:
  ids: np.ndarray  # (B, L) int32, right-padded with the pad id
  valid: np.ndarray  # (B, L) bool, real tokens
  loss_mask: np.ndarray  # (B, L) bool: position t predicts token t (the loss reads logits at t − 1)
  pixels: np.ndarray  # (B, S, S, 3) float32 ViT input (zeros for text-only turns)


class SequenceBuilder:
  """Token ids of prompts and turns, cached by text (the world has few distinct captions)."""

  def __init__(self, processor: Processor, max_len: int):
    self.processor, self.max_len = processor, int(max_len)
    self._cache: dict[str, list[int]] = {}
    self.image_block = IMG_START + IMG_CONTEXT * processor.num_image_tokens + IMG_END

  def encode(self, text: str) -> list[int]:
    if text not in self._cache:
      self._cache[text] = list(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return self._cache[text]

  def caption_prompt(self, instruction: str) -> list[int]:
    """The user turn of a captioning example, ending where the assistant starts."""
    return self.encode(chat_template(instruction + self.image_block))

  def answer(self, caption: str) -> list[int]:
    return self.encode(caption + IM_END)

  def captioning(self, instruction: str, caption: str) -> tuple[list[int], list[bool]]:
    prompt, answer = self.caption_prompt(instruction), self.answer(caption)
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)

  def text_only(self, caption: str, reply: str | None = None) -> tuple[list[int], list[bool]]:
    """The user says `caption`, the assistant replies `reply` (default: the same words)."""
    full = chat_template(caption)
    start = full.index(caption)
    head, said, tail = (self.encode(full[:start]), self.encode(caption), self.encode(full[start + len(caption) :]))
    answer = self.answer(caption if reply is None else reply)
    ids = head + said + tail + answer
    loss = [False] * len(head) + [True] * len(said) + [False] * len(tail) + [True] * len(answer)
    return ids, loss

  def check_fits(self, captions: list[str]) -> None:
    """Raises the ConfigError `pad` would, before any training: the longest turn any of `captions` makes (text-only,
    or captioning after any training or evaluation instruction) must fit data.max_len."""
    longest = 0
    for cap in set(captions):
      longest = max(longest, len(self.text_only(cap)[0]))
      longest = max([longest] + [len(self.captioning(i, cap)[0]) for i in (*INSTRUCTIONS, EVAL_INSTRUCTION)])
    self._check_length(longest)

  def _check_length(self, longest: int) -> None:
    if longest > self.max_len:
      raise ConfigError(f"a training sequence has {longest} tokens, more than data.max_len={self.max_len}; raise it")

  def pad(self, rows: list[tuple[list[int], list[bool]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded to the longest row rounded up to a multiple of 8 (a few compiled shapes, no wasted tokens)."""
    b = len(rows)
    longest = max(len(r) for r, _ in rows)
    self._check_length(longest)
    length = min(self.max_len, -(-longest // 8) * 8)
    ids = np.full((b, length), self.processor.pad_id, np.int32)
    valid = np.zeros((b, length), bool)
    loss = np.zeros((b, length), bool)
    for i, (r, m) in enumerate(rows):
      ids[i, : len(r)], valid[i, : len(r)], loss[i, : len(m)] = r, True, m
    return ids, valid, loss


def make_batch(
    builder: SequenceBuilder,
    pixels: np.ndarray,
    captions: list[str],
    rng: np.random.Generator,
    text_only_fraction: float,
) -> Batch:
  """One training batch from images (already ViT-preprocessed) and their captions (in any phrasing; the answers
  are in the plain grammar)."""
  rows, pix = [], np.zeros_like(pixels)
  for i, cap in enumerate(captions):
    plain = shapes.canonical_caption(cap)
    if rng.random() < text_only_fraction:
      rows.append(builder.text_only(cap, plain))
    else:
      rows.append(builder.captioning(INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))], plain))
      pix[i] = pixels[i]
  ids, valid, loss = builder.pad(rows)
  return Batch(ids=ids, valid=valid, loss_mask=loss, pixels=pix)
