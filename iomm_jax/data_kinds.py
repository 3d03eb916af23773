"""The names the data config allows: source kinds and recipes, in one place.

A core module (no imports), so the schema (`config.py`) and the data package (`data/sources.py`,
`data/pipeline.py`) read the same lists without `config.py` importing the data package.
"""

SOURCES = ("shapes", "folder", "arrayrecord", "tfds", "jsonl", "csv", "parquet")  # data.source (and data.image_source)
RECIPES = ("image", "pair", "mix")  # data.recipe: image-only, text-image pairs, λ-mix of both
# data.max_image_pixels default: PIL's own decompression-bomb error threshold (2 × Image.MAX_IMAGE_PIXELS).
MAX_IMAGE_PIXELS = 178_956_970
