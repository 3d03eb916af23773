"""Self-conditioned reconstruction check: is a sample conditioned on an (unmasked) image closer to that image?

  python -m iomm_jax.eval_recon --workdir=runs/tiny [--num=16]

For K held-out procedural images (never trained on), draws one image-conditioned sample each and computes the
K×K matrix of pixel MSEs between samples and references. Reports the mean MSE to the conditioning image
(diagonal), the mean MSE to the other images (off-diagonal), their ratio (the margin: > 1 means samples carry
their condition's content) and top-1 retrieval accuracy. Prints one JSON line and writes `<workdir>/recon.json`.

The images are always procedural shapes (the report's "images": "shapes"). A run trained on other data
(`data.source` other than 'shapes') is refused with one line before its model loads, since its figure would score
images it never saw; `--shapes_anyway` scores them all the same, and the report then says so ("out_of_domain": true,
"trained_on": the source) and a note is printed.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from iomm_jax import app_exit
from iomm_jax.train import generate as sample_lib
from iomm_jax.data import decode
from iomm_jax.data.sources import heldout_shapes
from iomm_jax.train import restore
from iomm_jax import output_folder, workdir_layout


def mse_matrix(samples: np.ndarray, refs: np.ndarray) -> np.ndarray:
  """(K, K) mean squared error between every sample i and every reference j (images in [-1, 1])."""
  s = samples.reshape(len(samples), -1).astype(np.float64)
  r = refs.reshape(len(refs), -1).astype(np.float64)
  # |s − r|² expanded, so memory grows with K², not K² × pixels (float64 keeps the cancellation harmless).
  sq = (s * s).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * (s @ r.T)
  return np.maximum(sq, 0.0) / s.shape[1]


def margin_stats(m: np.ndarray) -> dict:
  k = len(m)
  diag = float(np.mean(np.diag(m)))
  off = float((m.sum() - np.trace(m)) / (k * k - k))
  return {
      "mse_to_condition": diag,
      "mse_to_others": off,
      "margin": off / max(diag, 1e-12),
      "top1_retrieval": float(np.mean(np.argmin(m, axis=1) == np.arange(k))),
  }


def evaluate(
    run,
    params,
    *,
    num: int = 16,
    seed: int = 0,
    steps: int | None = None,
    cfg_scale: float | None = None,
    batch: int = 64,
) -> dict:
  """Reconstruction statistics of `params` on `num` held-out shapes images (another draw of the world), sampled
  `batch` at a time (the first batch with the seed's own key, so a `num` within one batch draws the same noise
  whatever `batch` is)."""
  if num < 2:
    raise ValueError(f"num={num}: the margin compares each sample with the other images; use 2 or more")
  c = run.config
  imgs, vit = heldout_shapes(c.data, num, start=1000)  # past the training grids' held-out images too
  refs = decode.to_signed_unit(imgs)
  key = jax.random.key(seed)
  out = [
      np.asarray(
          sample_lib.generate(
              run,
              params,
              vit_pixels=vit[i : i + batch],
              rng=key if i == 0 else jax.random.fold_in(key, i // batch),
              steps=steps,
              cfg_scale=cfg_scale,
          )
      )
      for i in range(0, num, batch)
  ]
  return margin_stats(mse_matrix(np.concatenate(out), refs))


def trained_on(workdir: str) -> str | None:
  """The run's data.source from its config.json (None when unreadable: loading the run then reports why)."""
  try:
    with open(workdir_layout.path(workdir, workdir_layout.CONFIG)) as f:
      return str(json.load(f)["data"]["source"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def main(argv=None) -> int:
  import argparse

  ap = argparse.ArgumentParser(
      prog="python -m iomm_jax.eval_recon", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--num", type=int, default=16, help="held-out images (2 or more)")
  ap.add_argument("--seed", type=int, default=0)
  restore.add_checkpoint_flags(ap)
  ap.add_argument("--batch", type=int, default=64, help="images sampled at a time (lower it if memory runs out)")
  ap.add_argument(
      "--shapes_anyway",
      action="store_true",
      help="score a run trained on other data on the procedural shapes images all the same (out of its domain)",
  )
  args = ap.parse_args(argv)
  if args.num < 2:
    ap.error(f"--num={args.num}: the margin compares each sample with the other images; give 2 or more")
  if args.batch < 1:
    ap.error(f"--batch={args.batch}: give 1 or more")
  source = trained_on(args.workdir)
  if source not in (None, "shapes") and not args.shapes_anyway:  # before the (slow) model load
    raise SystemExit(
        f"eval_recon: {args.workdir} trained on data.source={source!r}, but eval_recon scores procedural shapes "
        "images only, which this run never saw; pass --shapes_anyway to score them all the same"
    )

  report = workdir_layout.path(args.workdir, workdir_layout.RECON_REPORT)
  problem = output_folder.path_problem(report, folder=False)
  if problem:  # before the (slow) sampling
    raise SystemExit(f"eval_recon: cannot write its report: {problem}")
  run, params, step = restore.load_for_inference(args.workdir, step=args.step, use_ema=args.use_ema)
  source = str(run.config.data.source)
  stats = {
      "checkpoint_step": step,
      "num": args.num,
      "images": "shapes",
      "trained_on": source,
      "out_of_domain": source != "shapes",
      **evaluate(run, params, num=args.num, seed=args.seed, batch=args.batch),
  }
  if stats["out_of_domain"]:
    print(
        f"eval_recon: note: the margin is on procedural shapes images, out of the domain of this run "
        f"(data.source={source!r})",
        file=sys.stderr,
    )
  with output_folder.atomic_file(report) as tmp:
    tmp.write_text(json.dumps(stats, indent=2))
  print(json.dumps(stats))
  return 0


if __name__ == "__main__":
  sys.exit(app_exit.run(main))
