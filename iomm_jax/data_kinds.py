"""What the data config allows: source kinds, recipes, the pixel limit's default and the bucket rule, in one place.

A core module (no package imports), so the schema (`config.py`) and the data package (`data/sources.py`,
`data/pipeline.py`) read the same lists without `config.py` importing the data package.
"""

SOURCES = ("shapes", "folder", "arrayrecord", "tfds", "jsonl", "csv", "parquet")  # data.source (and data.image_source)
RECIPES = ("image", "pair", "mix")  # data.recipe: image-only, text-image pairs, λ-mix of both
# data.max_image_pixels default: PIL's own decompression-bomb error threshold (2 × Image.MAX_IMAGE_PIXELS).
MAX_IMAGE_PIXELS = 178_956_970
DIVISOR = 16  # each bucket side a multiple of 16: FLUX VAE 8× down × 2×2 DiT patches (fine for tiny pixel space too)


def check_buckets(buckets, field: str = "data.buckets") -> tuple[tuple[int, int], ...]:
  """The buckets as a tuple of (height, width) ints; raises ValueError naming ``field`` when malformed."""
  try:
    shapes = tuple((int(h), int(w)) for h, w in buckets)
    ok = all(float(h) == int(h) and float(w) == int(w) for h, w in buckets)
  except (TypeError, ValueError):
    shapes, ok = (), False
  if not ok:
    raise ValueError(
        f"{field}={buckets!r} must be a tuple of (height, width) pixel pairs, e.g. "
        "((512, 512), (384, 640), (640, 384)), or () for square centre crops"
    )
  for h, w in shapes:
    if h <= 0 or w <= 0 or h % DIVISOR or w % DIVISOR:
      raise ValueError(
          f"{field}: bucket ({h}, {w}) must have positive sides that are multiples of {DIVISOR} "
          "(autoencoder 8× down × 2×2 patches)"
      )
  if len(set(shapes)) != len(shapes):
    raise ValueError(f"{field}={shapes} lists a shape twice; list each (height, width) once")
  return shapes
