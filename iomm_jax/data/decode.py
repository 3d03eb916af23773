"""Image decoding and the two views the model sees: the autoencoder view and the ViT view.

Both views are the image's centre square: the short side is resized to ``resolution`` and the centre cropped
(done in one PIL resize with a crop box, which is the same operation at less cost). The ViT view is the same
square resized from the original straight to ``vit_size`` (bicubic; never an upsampled copy of the autoencoder view)
and normalised with the ImageNet mean/std, as InternVL does for one 448² tile.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class UnreadableImage(ValueError):
    """The record's image cannot be decoded (empty, corrupt, truncated or of an unknown format)."""


def to_rgb(record: dict, draft_size: int | None = None) -> Image.Image:
    """Decodes ``record['image_bytes']`` or wraps ``record['image']`` as an RGB PIL image; raises on bad data.

    ``draft_size`` lets JPEG decode at a reduced scale that still covers ``draft_size`` on the short side.
    """
    if record.get("image") is not None:
        arr = np.asarray(record["image"])
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or arr.size == 0:
            raise UnreadableImage(f"image array of dtype {arr.dtype} and shape {arr.shape}; expected uint8 HW[C]")
        im = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    else:
        data = record.get("image_bytes")
        if not data:
            raise UnreadableImage("zero-byte image")
        try:
            im = Image.open(io.BytesIO(data))
            if draft_size and im.format == "JPEG":
                w, h = im.size
                s = draft_size / min(w, h)  # request the size whose short side is draft_size
                im.draft("RGB", (max(1, int(w * s + 0.999)), max(1, int(h * s + 0.999))))
            im.load()  # full decode here, so truncation raises now rather than in resize
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            raise UnreadableImage(f"{type(e).__name__}: {e}") from e
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent pixels become white, not black
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def centre_square(im: Image.Image, resolution: int) -> Image.Image:
    """Short-side resize to ``resolution`` then centre crop to a square, in one antialiased bicubic resize."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    if (w, h) == (resolution, resolution):
        return im
    return im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def views(im: Image.Image, resolution: int, vit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``pixels`` float32 (res, res, 3) in [-1, 1] and ``vit_pixels`` float32 (vit, vit, 3) ImageNet-normalised."""
    sq = centre_square(im, resolution)
    pixels = np.asarray(sq, np.float32) / 127.5 - 1.0
    vit = sq if vit_size == resolution else centre_square(im, vit_size)
    vit_pixels = (np.asarray(vit, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return pixels, vit_pixels.astype(np.float32)
