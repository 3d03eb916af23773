"""Generation: text-to-image, image-conditioned (self-conditioning, no mask) and zero-shot editing.

CLI:
  python -m iomm_jax.sample --workdir=runs/tiny --prompt="a red circle" --num=8 --out=DIR
  python -m iomm_jax.sample --workdir=runs/tiny --image=PATH [--edit="make it blue"] --num=4 --out=DIR
  python -m iomm_jax.sample --workdir=runs/tiny --prompts_file=P.jsonl --num=4 --out=DIR
Writes PNG grids (one row per prompt/image) into --out (default <workdir>/samples). With --prompts_file (JSONL, one
GenEval metadata object with a "prompt" per line) it writes GenEval's sample folder layout instead
(DIR/<00000>/metadata.jsonl, samples/<0000>.png, grid.png; default DIR <workdir>/samples/geneval), replacing an
earlier sample output there; a DIR that holds anything else (a workdir's checkpoints/) is refused before sampling.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from iomm_jax import app_exit
from iomm_jax import geneval_layout, output_folder
from iomm_jax.models import iomm
from iomm_jax.train.generate import (
    add_sampling_flags,
    check_sampling_flags,
    generate,
    grid,
    prompt_notes,
    save_png,
    to_uint8,
)
from iomm_jax.data import decode
from iomm_jax.train import restore
from iomm_jax import workdir_layout

# The grids main writes into --out beside a GenEval layout there: its own files, so a rerun may replace them.
GRID_FILES = ("prompt_[0-9]*.png", "image_[0-9]*.png")


def write_geneval(
    run,
    params,
    metadata: list[dict],
    out_dir: str,
    *,
    num: int,
    rng,
    steps=None,
    cfg_scale=None,
    prompt_of=None,
    also_own: tuple[str, ...] = (),
    reports: tuple[str, ...] = (),
    with_prompts: bool = False,
) -> str:
  """Samples `num` images per metadata object (prompt i in list order, one generate call each) into GenEval's layout.

  Prompt i's noise is `fold_in(rng, i)`, so its samples do not depend on the other prompts. `prompt_of(metadata)`
  gives the text to condition on (default its "prompt"; "" samples unconditionally while the metadata stays).
  `out_dir` must be new, empty or an earlier sample folder (`geneval_layout.check_out_dir`; `also_own`: top-level
  files there that are the caller's own), else OutputPathError before any sample. `reports` (files describing the
  earlier samples) are removed just before the new ones take their place; `with_prompts` writes the prompt set into
  the folder with them (geneval_layout.PROMPTS_FILE).
  """
  prompt_of = prompt_of or (lambda m: m["prompt"])
  with geneval_layout.Writer(out_dir, also_own, reports) as w:
    if with_prompts:
      w.write_prompts(metadata)
    for i, m in enumerate(metadata):
      imgs = generate(
          run, params, prompts=[prompt_of(m)] * num, rng=jax.random.fold_in(rng, i), steps=steps, cfg_scale=cfg_scale
      )
      w.add(i, m, to_uint8(imgs))
  return out_dir


def load_image_views(path: str, data_cfg) -> tuple[np.ndarray, np.ndarray]:
  """(pixels in [-1,1] at data.resolution, ViT view) of one image file, through training's own preparation path
  (EXIF orientation, transparency on white, one resize + centre crop, ViT view from the original)."""

  try:
    img = decode.load_file(path, data_cfg.max_image_pixels)
  except (OSError, decode.UnreadableImage) as e:
    raise SystemExit(f"--image={path!r} cannot be read as an image ({e}); give a PNG/JPEG/WebP file") from None
  return decode.views(img, data_cfg.resolution, data_cfg.vit_size)


def main(argv=None) -> int:
  import argparse

  ap = argparse.ArgumentParser(
      prog="python -m iomm_jax.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints/)")
  ap.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
  ap.add_argument("--image", action="append", default=[], help="condition on this image (repeatable)")
  ap.add_argument(
      "--prompts_file",
      default=None,
      help='JSONL of GenEval metadata objects ({"prompt": ...}); writes GenEval\'s folder layout',
  )
  ap.add_argument("--edit", default=None, help="with --image: an edit instruction instead of the aux prompt")
  add_sampling_flags(ap, num=8, num_help="samples per prompt/image")
  ap.add_argument("--out", default=None, help="output folder (default <workdir>/samples)")
  restore.add_checkpoint_flags(ap)
  args = ap.parse_args(argv)
  if args.edit and not args.image:  # before the next check, whose advice would not say what --edit needs
    ap.error("--edit is an instruction for the --image inputs; give one or more --image")
  if not args.prompt and not args.image and not args.prompts_file:
    ap.error("give at least one --prompt, --image or --prompts_file")
  check_sampling_flags(ap, args)
  if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    ap.error(f"--workdir={args.workdir} is a file; give the folder a training run wrote (python -m iomm_jax.main)")
  if args.out and args.prompts_file and (args.prompt or args.image):  # two layouts in one folder: neither reads clean
    ap.error(
        "--out takes either --prompts_file's GenEval folder or the --prompt/--image grids: sample them in two "
        "commands, or drop --out (grids go to <workdir>/samples, the GenEval folder to <workdir>/samples/geneval)"
    )
  out = args.out or workdir_layout.path(args.workdir, workdir_layout.SAMPLES)
  problem = output_folder.path_problem(out, folder=True) if args.prompt or args.image else ""
  if problem:
    ap.error(f"--out: {problem}" if args.out else problem)
  metadata, folder = None, None
  if args.prompts_file:  # checked before the (slow) model load, and before anything is written
    try:
      metadata = geneval_layout.read_prompts(args.prompts_file)
    except geneval_layout.PromptsFileError as e:
      raise SystemExit(f"--prompts_file: {e}") from None
    folder = args.out or os.path.join(args.workdir, workdir_layout.SAMPLES, "geneval")
    try:  # an --out holding anything but an earlier sample output (a workdir's checkpoints/) is never replaced
      geneval_layout.check_out_dir(folder, GRID_FILES)
    except geneval_layout.OutputPathError as e:
      raise SystemExit(f"--out: {e}" if args.out else str(e)) from None

  run, params, step = restore.load_for_inference(args.workdir, step=args.step, use_ema=args.use_ema)
  image_views = [load_image_views(path, run.config.data) for path in args.image]  # all read before anything is written
  texts = list(args.prompt) + ([m["prompt"] for m in metadata] if metadata else [])
  for note in prompt_notes(run.tokenize, texts):
    print(note, file=sys.stderr)
  rng = jax.random.key(args.seed)
  written = []
  for i, prompt in enumerate(args.prompt):
    imgs = generate(
        run, params, prompts=[prompt] * args.num, rng=jax.random.fold_in(rng, i), steps=args.steps, cfg_scale=args.cfg
    )
    path = os.path.join(out, f"prompt_{i:02d}.png")
    save_png(path, grid([to_uint8(imgs)]), upscale=max(1, 128 // imgs.shape[1]))
    written.append({"prompt": prompt, "path": path})
  tpl = run.templates
  if args.edit:
    tpl = iomm.make_templates(run.processor, args.edit, run.config.data.max_text_tokens)
  for i, (image_path, (pixels, vit)) in enumerate(zip(args.image, image_views)):
    imgs = generate(
        run,
        params,
        vit_pixels=np.repeat(vit[None], args.num, 0),
        tpl=tpl,
        rng=jax.random.fold_in(rng, 1000 + i),
        steps=args.steps,
        cfg_scale=args.cfg,
    )
    path = os.path.join(out, f"image_{i:02d}.png")
    ref = to_uint8(pixels[None])
    save_png(path, grid([np.concatenate([ref, to_uint8(imgs)])]), upscale=max(1, 128 // imgs.shape[1]))
    written.append({"image": image_path, "edit": args.edit, "path": path})
  if metadata is not None:
    try:
      write_geneval(
          run,
          params,
          metadata,
          folder,
          num=args.num,
          rng=jax.random.fold_in(rng, 2000),
          steps=args.steps,
          cfg_scale=args.cfg,
          also_own=GRID_FILES,
      )
    except geneval_layout.OutputPathError as e:  # something was put in --out while sampling: it is left alone
      raise SystemExit(f"--out: {e}" if args.out else str(e)) from None
    written.append({"prompts_file": args.prompts_file, "prompts": len(metadata), "path": folder})
  print(json.dumps({"checkpoint_step": step, "written": written}))
  return 0


if __name__ == "__main__":
  sys.exit(app_exit.run(main))
