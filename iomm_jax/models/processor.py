"""Prompt template, tokenizer and image preprocessing of the frozen MLLM (docs/design.md §1, paper Fig. 2a).

Prompts use the InternVL (Qwen2) chat template with one user turn:

    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n

Image-only samples: content = aux text followed directly by `<img>` + N×`<IMG_CONTEXT>` + `</img>` (text, then
the bracketed image; c = concat(c_aux, c_img)). Text samples: content = the text; the empty text is the
unconditional prompt. Images: one 448² tile, bicubic resize, ImageNet mean/std (as InternVL).

`Processor.from_pretrained(DIR)` uses the checkpoint's own tokenizer (offline); `Processor.tiny(n)` builds a
small word-level tokenizer in code, for the tiny config and tests (no download).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from iomm_jax.config import AUX_PROMPT as DEFAULT_AUX_PROMPT  # the config's default, held once
from iomm_jax.models.internvl_keys import EXPECTED_LAYOUT, MLLMCheckpointError, read_config

TOKENIZER_FILE = "tokenizer.json"  # the fast tokenizer an InternVL -hf folder ships (with tokenizer_config.json)

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TINY_SPECIAL_TOKENS = (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, "<pad>", "<unk>", "\n")
TINY_WORDS = (
    # colours
    "red green blue yellow purple orange white black gray grey cyan magenta pink brown "
    # shapes
    "circle circles square squares triangle triangles star stars cross crosses diamond diamonds shape shapes "
    "rectangle ellipse dot line "
    # positions / relations
    "above below left right of next to and a an the on top bottom center centre middle in at with "
    "corner near far small big large tiny "
    # template and aux prompt words
    "user assistant generate image that is identical to reference same as picture photo draw "
    # numbers
    "one two three four five zero "
    # punctuation
    ": . , ! ? "
    # appended later (ids above stay stable): every shape of the shapes world, and captioning instructions
    "hexagon hexagons describe what this caption shows there"
).split()


def chat_template(content: str) -> str:
  """The InternVL chat wrapper for one user turn, ready for generation."""
  return f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"


def build_tiny_tokenizer():
  """A word-level `PreTrainedTokenizerFast` over TINY_SPECIAL_TOKENS + TINY_WORDS (lower-cased, unknown → <unk>)."""
  from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {}
  for tok in TINY_SPECIAL_TOKENS + tuple(TINY_WORDS):
    vocab.setdefault(tok, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
  # Special tokens (and the newline of the template) are matched before normalisation and splitting.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token=IM_END)


class Processor:
  """Tokenizer + template + image preprocessing for InternVL3 conditioning."""

  def __init__(
      self,
      tokenizer,
      *,
      num_image_tokens: int = 256,
      image_size: int = 448,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      aux_prompt: str = DEFAULT_AUX_PROMPT,
  ):
    self.tokenizer = tokenizer
    self.num_image_tokens, self.image_size = int(num_image_tokens), int(image_size)
    self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self.aux_prompt = aux_prompt
    unk = tokenizer.unk_token_id
    for t in (IMG_START, IMG_END, IMG_CONTEXT, IM_START, IM_END):
      tid = tokenizer.convert_tokens_to_ids(t)
      if tid is None or (unk is not None and tid == unk):
        raise ValueError(f"Processor: the tokenizer has no token {t!r}; it is not an InternVL tokenizer")
    self._image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)

  @classmethod
  def from_pretrained(cls, path: str | Path, **kwargs) -> "Processor":
    """The tokenizer of a local InternVL3 -hf directory (offline); sizes from its config.json if present."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
      raise FileNotFoundError(f"Processor.from_pretrained: {p} is not a directory; {EXPECTED_LAYOUT}")
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if (p / "config.json").is_file():

      cfg = read_config(p)
      kwargs.setdefault("num_image_tokens", cfg.num_image_tokens)
      kwargs.setdefault("image_size", cfg.vision.image_size)
    return cls(tokenizer, **kwargs)

  @classmethod
  def tiny(cls, num_image_tokens: int = 4, image_size: int = 56, **kwargs) -> "Processor":
    """The built-in word-level tokenizer (vocab_size ≈ 120), for the tiny config and tests."""
    return cls(build_tiny_tokenizer(), num_image_tokens=num_image_tokens, image_size=image_size, **kwargs)

  # -- ids ---------------------------------------------------------------------------------------------------
  @property
  def image_token_id(self) -> int:
    return int(self._image_token_id)

  @property
  def pad_id(self) -> int:
    tid = self.tokenizer.pad_token_id
    if tid is None:
      tid = self.tokenizer.eos_token_id
    return int(tid if tid is not None else 0)

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  def _encode(self, text: str) -> list[int]:
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def image_prompt_ids(self, aux_prompt: str | None = None) -> list[int]:
    """Template(aux text + <img> N×<IMG_CONTEXT> </img>); aux_prompt None = the default aux prompt."""
    aux = self.aux_prompt if aux_prompt is None else aux_prompt
    ids = self._encode(chat_template(aux + IMG_START + IMG_CONTEXT * self.num_image_tokens + IMG_END))
    n = sum(i == self.image_token_id for i in ids)
    if n != self.num_image_tokens:
      raise ValueError(
          f"image_prompt_ids: the tokenizer produced {n} {IMG_CONTEXT} tokens, expected " f"{self.num_image_tokens}"
      )
    return ids

  def text_prompt_ids(self, text: str = "") -> list[int]:
    """Template(text); the empty text gives the unconditional prompt."""
    return self._encode(chat_template(text))

  # -- images ------------------------------------------------------------------------------------------------
  def preprocess_image(self, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) (or (H, W) / (H, W, 1) / (H, W, 4)) → float32 (S, S, 3): bicubic resize to the ViT size,
    scale to [0, 1], ImageNet mean/std."""
    from PIL import Image

    img = np.asarray(image)
    if img.dtype != np.uint8:
      raise ValueError(f"preprocess_image expects uint8 pixels, got {img.dtype}")
    if img.ndim == 2:
      img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
      raise ValueError(f"preprocess_image expects (H, W, 3) pixels, got shape {img.shape}")
    if img.shape[-1] == 1:
      img = np.repeat(img, 3, axis=-1)
    img = img[..., :3]
    if img.shape[:2] != (self.image_size, self.image_size):
      img = np.asarray(Image.fromarray(img).resize((self.image_size, self.image_size), Image.BICUBIC))
    return vit_normalize(img, self.mean, self.std)


def vit_normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
  """uint8 (…, 3) → float32 scaled to [0, 1], then (x − mean) / std per channel (InternVL's ImageNet statistics by
  default): the one ViT normalisation, used by the training pipeline's ViT view (data/decode) too."""
  x = np.asarray(image, np.float32) / 255.0
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def tokenizer_problem(path: str | Path, error: BaseException) -> str:
  """One line naming the tokenizer file behind `error` (raised loading `path`'s tokenizer): a missing or unparsable
  tokenizer.json, else the loader's own message on one line."""
  p = Path(path)
  file = p / TOKENIZER_FILE
  if not file.is_file():
    return (
        f"{p} has no {TOKENIZER_FILE}, so its tokenizer cannot be loaded; copy {TOKENIZER_FILE} and "
        "tokenizer_config.json from the model's download into it"
    )
  try:
    json.loads(file.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    return f"{file} is not valid JSON ({e}); download the file again"
  reason = f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]
  return (
      f"{p}: its tokenizer files ({TOKENIZER_FILE}, tokenizer_config.json) cannot be loaded as an InternVL tokenizer "
      f"({reason})"
  )


def load_processor(path: str | Path) -> Processor:
  """`path`'s tokenizer and templates, as training loads them; MLLMCheckpointError naming the file when they cannot
  be loaded."""
  try:
    return Processor.from_pretrained(path)
  except Exception as e:  # noqa: BLE001 — tokenizers raises bare Exceptions for a tokenizer.json it cannot parse
    raise MLLMCheckpointError(tokenizer_problem(path, e)) from None
