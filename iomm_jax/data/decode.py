"""The one image-preparation path: decode → EXIF orientation → RGB → resize + centre crop, and the two views.

Used by training (``pipeline``), aspect-ratio buckets, ``prepare``'s validation, the feature cache, ``sample``'s
reference images and the evaluations, so every consumer sees an image the same way:

* **Decode** (:func:`open_image`): the header's width × height is checked against ``data.max_image_pixels`` before
  any pixel is decoded (decompression bombs are skipped and counted, never decoded; PIL's own global limit is off,
  this one replaces it), then the whole image is decoded, so truncation raises here and not later.
* **Orientation**: the EXIF orientation tag is applied (a phone photo stored sideways comes out upright).
* **RGB** (:func:`to_rgb_mode`): 16-bit grey (``I;16``, ``I;16B``, ``I``) is scaled to 8 bits (÷257, not clipped);
  32-bit float grey (``F``, e.g. a scientific TIFF) is read as [0, 1] when no sample exceeds 1, else as 0–255;
  transparency (RGBA, LA, PA, P with a transparent index) is composited on white; CMYK and the rest convert with PIL.
* **Crop**: resize so the image covers the target (height, width), centre crop, in one antialiased bicubic resize
  with a crop box (:func:`cover_box`). Square targets give the image's centre square.
* **Views** (:func:`views`): ``pixels`` in [-1, 1] at the target size, and the ViT view: the same region resized from
  the original straight to one ``vit_size``² tile (never an upsampled copy of ``pixels``), ImageNet mean/std as
  InternVL does.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from iomm_jax.data_kinds import MAX_IMAGE_PIXELS
from iomm_jax.models import processor

# data.max_image_pixels is the limit, checked on the header before decoding; PIL's global one would otherwise warn
# or raise at its own threshold whatever the config says.
Image.MAX_IMAGE_PIXELS = None
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 'I' (int32) holds 16-bit samples from PNG/PGM/TIFF readers
_WHITE = (255, 255, 255, 255)


class UnreadableImage(ValueError):
  """The record's image cannot be decoded (empty, corrupt, truncated or of an unknown format)."""


class ImageTooLarge(UnreadableImage):
  """The image has more pixels than ``data.max_image_pixels`` (a likely decompression bomb); not decoded."""


class ImageTooSmall(UnreadableImage):
  """The image's short side is under ``data.min_image_side`` (an icon, a tracking pixel); not decoded."""


def check_pixels(width: int, height: int, max_pixels: int, min_side: int = 0) -> None:
  """Raises :class:`ImageTooLarge` when ``width × height`` exceeds ``max_pixels`` (0 = no limit), and
  :class:`ImageTooSmall` when the short side is under ``min_side`` (0 = none)."""
  if max_pixels and width * height > max_pixels:
    raise ImageTooLarge(f"{width}x{height} = {width * height} pixels exceeds data.max_image_pixels={max_pixels}")
  if min(width, height) < min_side:
    raise ImageTooSmall(f"{width}x{height}: its short side is under data.min_image_side={min_side}")


def orient(im: Image.Image) -> Image.Image:
  """The image with its EXIF orientation applied (unchanged when there is none)."""
  if im.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
    return im
  return ImageOps.exif_transpose(im)


def to_rgb_mode(im: Image.Image) -> Image.Image:
  """Any PIL mode → 8-bit RGB: 16-bit grey scaled by 1/257, float grey in [0, 1] by 255, transparency on white."""
  if im.mode in _SIXTEEN_BIT:
    arr = np.asarray(im).astype(np.float64)  # I;16B arrives big-endian; numpy reads it by its dtype
    im = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
  if im.mode == "F":
    # PIL would clip float samples to 0–255, so an image stored in [0, 1] (the usual float convention) came out black.
    arr = np.nan_to_num(np.asarray(im, np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
    im = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
  if im.mode in ("RGBa", "La"):  # premultiplied alpha
    im = im.convert("RGBA")
  if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
    im = im.convert("RGBA")
    im = Image.alpha_composite(Image.new("RGBA", im.size, _WHITE), im)  # transparent → white, as a page
  return im if im.mode == "RGB" else im.convert("RGB")


def open_image(
    data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 0, draft_size: int | None = None
) -> Image.Image:
  """Encoded bytes → oriented RGB PIL image; raises :class:`UnreadableImage` (or :class:`ImageTooLarge` /
  :class:`ImageTooSmall`, from the header, before any pixel is decoded).

  ``draft_size`` lets JPEG decode at a reduced scale whose short side still covers ``draft_size``.
  """
  if not data:
    raise UnreadableImage("zero-byte image")
  try:
    im = Image.open(io.BytesIO(data))
    w, h = im.size
  except UnidentifiedImageError:  # PIL's message names its in-memory buffer (<_io.BytesIO object at 0x…>)
    raise UnreadableImage(f"not an image format PIL reads (starts {data[:8]!r})") from None
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise UnreadableImage(f"{type(e).__name__}: {e}") from e
  check_pixels(w, h, max_pixels, min_side)
  try:
    if draft_size and im.format == "JPEG":
      s = draft_size / min(w, h)  # request the size whose short side is draft_size
      im.draft("RGB", (max(1, int(w * s + 0.999)), max(1, int(h * s + 0.999))))
    im.load()  # full decode here, so truncation raises now rather than in resize
    return to_rgb_mode(orient(im))
  except Exception as e:
    raise UnreadableImage(f"{type(e).__name__}: {e}") from e


def to_rgb(
    record: dict, draft_size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 0
) -> Image.Image:
  """``record['image_bytes']`` (decoded by :func:`open_image`) or ``record['image']`` (uint8 HW[C]) as RGB."""
  if record.get("image") is not None:
    arr = np.asarray(record["image"])
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or arr.size == 0:
      raise UnreadableImage(f"image array of dtype {arr.dtype} and shape {arr.shape}; expected uint8 HW[C]")
    check_pixels(arr.shape[1], arr.shape[0], max_pixels, min_side)
    return to_rgb_mode(Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr))
  return open_image(record.get("image_bytes"), max_pixels=max_pixels, min_side=min_side, draft_size=draft_size)


def load_file(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
  """An image file as an oriented RGB image; raises OSError or :class:`UnreadableImage`."""
  with open(path, "rb") as f:
    return open_image(f.read(), max_pixels=max_pixels)


def header_size(src) -> tuple[int, int]:
  """(width, height) as displayed (EXIF orientations 5–8 swap the sides) of encoded bytes or a file path, from the
  header only; raises like ``Image.open``."""
  with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
    w, h = im.size
    if im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
      w, h = h, w
  return w, h


def cover_box(w: int, h: int, height: int, width: int) -> tuple[float, float, float, float]:
  """The centred region of a w×h image that, resized to (height, width), covers it without distortion.

  Exact along the side that spans the whole image, so a square target gives exactly the centre square.
  """
  if width * h >= height * w:  # the target is relatively wider: the region spans the full width
    cw, ch = float(w), w * height / width
  else:
    cw, ch = h * width / height, float(h)
  left, top = (w - cw) / 2.0, (h - ch) / 2.0
  return left, top, left + cw, top + ch


def _resize(im: Image.Image, box, height: int, width: int) -> Image.Image:
  if im.size == (width, height) and box == (0.0, 0.0, float(width), float(height)):
    return im
  return im.resize((width, height), Image.Resampling.BICUBIC, box=box)


def cover_crop(im: Image.Image, height: int, width: int) -> Image.Image:
  """Resize so the image covers (height, width), then centre-crop to it, in one bicubic resize with a box."""
  return _resize(im, cover_box(*im.size, height, width), height, width)


def centre_square(im: Image.Image, resolution: int) -> Image.Image:
  """Short-side resize to ``resolution`` then centre crop to a square, in one antialiased bicubic resize."""
  return cover_crop(im, resolution, resolution)


vit_normalize = processor.vit_normalize  # uint8 → ImageNet-normalised float32, as the MLLM's own processor does


def to_signed_unit(image) -> np.ndarray:
  """uint8 pixels → float32 in [-1, 1], the generator's pixel range (train/generate.to_uint8 inverts it)."""
  return np.asarray(image, np.float32) / 127.5 - 1.0


def views(im: Image.Image, resolution: int, vit_size: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``pixels`` float32 (resolution, width or resolution, 3) in [-1, 1] and ``vit_pixels`` float32
  (vit_size, vit_size, 3), ImageNet-normalised: the same region of the original, resized straight to the tile."""
  height, width = resolution, width or resolution
  box = cover_box(*im.size, height, width)
  crop = _resize(im, box, height, width)
  pixels = to_signed_unit(crop)
  vit = crop if (vit_size, vit_size) == (height, width) else _resize(im, box, vit_size, vit_size)
  return pixels, vit_normalize(np.asarray(vit))
