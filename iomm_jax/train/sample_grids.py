"""Training-time sample grids, for any data source: held-out images with their image-conditioned samples, then one
row per validation prompt.

Rows: the first ``sample.num`` held-out images (when the run has a held-out set of images; ``data/holdout.py``),
their reconstructions (the sampler conditioned on each image, unmasked), and ``sample.num`` samples of each prompt
of ``sample.prompts_file`` (a GenEval-style JSONL file) or else ``sample.prompts``. Written to
``<workdir>/samples/step_<step>.png`` and to TensorBoard as ``samples``. The noise is fixed, so grids of successive
steps differ only by what the model learned.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from iomm_jax import geneval_layout
from iomm_jax.train import generate as generate_lib
from iomm_jax import workdir_layout

GRID_SEED_SALT = 17  # the grids' noise: key(config.seed + GRID_SEED_SALT)


def grid_prompts(sample_cfg) -> list[str]:
  """The grid's text prompts: ``sample.prompts_file`` when set (one clear line if it is unreadable), else
  ``sample.prompts``."""
  if not sample_cfg.prompts_file:
    return list(sample_cfg.prompts)
  try:
    return [m["prompt"] for m in geneval_layout.read_prompts(sample_cfg.prompts_file)]
  except geneval_layout.PromptsFileError as e:
    raise SystemExit(f"config.sample.prompts_file: {e}") from None


class SampleGrids:
  """``grids(step, params, writer) -> path`` (see the module docstring); ``seconds`` is the time of the last grid."""

  def __init__(self, run, workdir: str, held_out: dict | None):
    c = run.config
    self.run, self.dir = run, workdir_layout.path(workdir, workdir_layout.SAMPLES)
    self.prompts = grid_prompts(c.sample)
    self.ref = self.vit = None
    if held_out is not None and "pixels" in held_out:  # a feature cache holds no pixels to show or condition on
      n = min(c.sample.num, len(held_out["pixels"]))
      self.ref = generate_lib.to_uint8(held_out["pixels"][:n])
      self.vit = held_out["vit_pixels"][:n]
    self.seconds = 0.0

  def __call__(self, step: int, params, writer) -> str:
    t0 = time.perf_counter()
    c = self.run.config
    rng = jax.random.key(c.seed + GRID_SEED_SALT)
    rows = []
    if self.ref is not None:
      recon = generate_lib.generate(self.run, params, vit_pixels=self.vit, rng=rng)
      rows += [self.ref, generate_lib.to_uint8(recon)]
    for i, prompt in enumerate(self.prompts):
      images = generate_lib.generate(
          self.run, params, prompts=[prompt] * c.sample.num, rng=jax.random.fold_in(rng, i + 1)
      )
      rows.append(generate_lib.to_uint8(images))
    image = generate_lib.grid(rows)
    path = os.path.join(self.dir, f"step_{step:07d}.png")
    if jax.process_index() == 0:
      generate_lib.save_png(path, image, upscale=max(1, 96 // c.data.resolution))
      writer.image(step, "samples", np.asarray(image))
    self.seconds = time.perf_counter() - t0
    return path
