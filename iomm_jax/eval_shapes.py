"""Mini-GenEval for the procedural shapes world: does the generator draw what the prompt says?

  python -m iomm_jax.eval_shapes --workdir=runs/tiny [--num=4] [--out=DIR] [--uncond] [--phrasing=geneval]
  python -m iomm_jax.eval_shapes --samples=DIR [--workdir=W]                          # score a GenEval folder
  python -m iomm_jax.eval_shapes --validate [--resolution=32]                         # scorer on true renders
  python -m iomm_jax.eval_shapes --write_prompts=P.jsonl     # the prompt set, for sample.py --prompts_file

The benchmark — its prompts, categories, scoring rules and chance level — is defined in `shapes_benchmark`; this
module samples a run, scores it and writes the report. Writes `<workdir>/eval_shapes.json` (scores, chance, counts,
per-prompt results), `<workdir>/eval_shapes.png` (two prompts per category: the prompt, then its samples framed green
when correct, red when not) and the samples in GenEval's layout under `<workdir>/eval_shapes/samples` (or --out),
with the prompt set as `prompts.jsonl` in that folder; prints one JSON line. With --uncond every default name gets
the suffix `_uncond`; with --phrasing=geneval (the same prompts worded as GenEval words them, "a photo of an orange
circle left of a red square") the suffix `_geneval`. An --out (or a --write_prompts path) that cannot be written, or
that holds anything but an earlier sample output, stops the run with one line before the model loads. --samples also
scores a folder sampled from GenEval's own metadata over this world's shapes and colours (tags such as "colors",
"counting", "color_attr"; `shapes_benchmark` says how).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from iomm_jax import app_exit
from iomm_jax import geneval_layout, output_folder, shapes_benchmark, write_failures
from iomm_jax import sample as sample_lib
from iomm_jax.train import restore
from iomm_jax.train.generate import add_sampling_flags, check_sampling_flags
from iomm_jax import workdir_layout

# ---------------------------------------------------------------------------------------------------- outputs


def score_folder(folder: str) -> tuple[list[dict], dict]:
  """(metadata list, score_images result) of a GenEval-layout folder."""
  entries = geneval_layout.read_folders(folder)
  if not entries:
    raise ValueError(f"{folder} holds no digit-named prompt folders (GenEval layout)")
  metadata, images = [], []
  for prompt_dir, meta, pngs in entries:
    if not pngs:
      raise ValueError(f"{prompt_dir / geneval_layout.SAMPLES_DIR} holds no PNGs")
    try:
      shapes_benchmark.check_metadata(meta)
    except ValueError as e:
      raise ValueError(
          f"{prompt_dir / geneval_layout.METADATA_FILE} cannot be scored in the shapes world: {e}"
      ) from None
    metadata.append(meta)
    loaded = [geneval_layout.load_image(p) for p in pngs]
    size = (images[0] if images else loaded[0]).shape[-3:]
    for path, img in zip(pngs, loaded):
      if img.shape != size:  # the detector's chance and grid assume one resolution
        raise ValueError(f"{path} is {img.shape[1]}×{img.shape[0]}, the folder's samples {size[1]}×{size[0]}")
    images.append(np.stack(loaded))
  return metadata, {
      **shapes_benchmark.score_images(metadata, images),
      "resolution": int(images[0].shape[1]),
      "images": images,
  }


def _samples_per_prompt(folder: str, metadata: list[dict], images: list[np.ndarray]) -> int | list[int]:
  """The samples each prompt has: one number, or [fewest, most] with a note on stderr naming the first prompt with
  the fewest (a folder assembled by hand, or a copy cut short, is scored as it is, but not silently)."""
  counts = [len(x) for x in images]
  if min(counts) == max(counts):
    return counts[0]
  short = counts.index(min(counts))
  print(
      f"note: {folder}: prompts have {min(counts)} to {max(counts)} samples (first with {min(counts)}: "
      f"{metadata[short].get('prompt')!r}); each is scored on the samples it has",
      file=sys.stderr,
  )
  return [min(counts), max(counts)]


def picture(rows: list[tuple[str, np.ndarray, list[bool]]], path: str) -> None:
  """One row per prompt: its text, then its samples (upscaled to ~128 px), framed green when correct, red when not."""
  from PIL import Image, ImageDraw, ImageFont

  try:
    font = ImageFont.load_default(size=13)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font
    font = ImageFont.load_default()
  scale = max(1, 128 // rows[0][1].shape[1])
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  text_w = int(max(probe.textlength(t, font=font) for t, _, _ in rows)) + 12
  h, w = rows[0][1].shape[1] * scale, rows[0][1].shape[2] * scale
  cols = max(len(imgs) for _, imgs, _ in rows)
  frame, pad = 3, 4
  cell_w, cell_h = w + 2 * frame + pad, h + 2 * frame + pad
  canvas = Image.new("RGB", (text_w + cols * cell_w + pad, len(rows) * cell_h + pad), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (text, imgs, correct) in enumerate(rows):
    y = pad + i * cell_h
    draw.text((6, y + cell_h // 2 - 6), text, fill=(0, 0, 0), font=font)
    for j, (img, ok) in enumerate(zip(imgs, correct)):
      x = text_w + j * cell_w
      draw.rectangle([x, y, x + w + 2 * frame - 1, y + h + 2 * frame - 1], fill=(40, 170, 60) if ok else (210, 40, 40))
      canvas.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (x + frame, y + frame))
  with write_failures.writing(path), output_folder.atomic_file(path) as tmp:  # a full disk names `path`
    canvas.save(tmp, format="PNG")


def _grid_rows(metadata: list[dict], per_tag: int = 2) -> list[int]:
  rows, seen = [], {}
  for i, m in enumerate(metadata):
    if seen.get(m["tag"], 0) < per_tag:
      seen[m["tag"]] = seen.get(m["tag"], 0) + 1
      rows.append(i)
  return rows


def report(folder: str, json_path: str, png_path: str, extra: dict | None = None) -> dict:
  """Scores a GenEval folder, writes the JSON report and the picture; returns the one-line summary."""
  metadata, res = score_folder(folder)
  images = res.pop("images")
  rows = _grid_rows(metadata)
  # The old report goes before the new picture: a kill between the two writes leaves no report, never an old one
  # beside a picture it does not describe.
  Path(json_path).unlink(missing_ok=True)
  picture([(metadata[i]["prompt"], images[i], res["per_prompt"][i]["correct"]) for i in rows], png_path)
  ch = shapes_benchmark.chance(metadata)
  summary = {
      **(extra or {}),
      "samples": folder,
      "resolution": res["resolution"],
      "num_per_prompt": _samples_per_prompt(folder, metadata, images),
      "prompts": len(metadata),
      "scores": res["scores"],
      "overall": res["overall"],
      "diagnostics": res["diagnostics"],
      "chance": ch,
      "counts": res["counts"],
      "report": json_path,
      "picture": png_path,
  }
  full = {**summary, "picture_rows": [metadata[i]["prompt"] for i in rows], "per_prompt": res["per_prompt"]}
  with write_failures.writing(json_path), output_folder.atomic_file(json_path) as tmp:
    tmp.write_text(json.dumps(full, indent=2))
  return summary


def _given(ap, argv: list[str], dests: list[str]) -> list[str]:
  """The options of `ap` among `dests` that `argv` gives (in any spelling argparse takes, abbreviations too), named
  as the parser names them ("--use-ema/--no-ema" for a shared destination), in `dests`' order."""
  unset = object()
  probe = argparse.Namespace(**{a.dest: unset for a in ap._actions})  # argparse fills in defaults only where absent
  ap.parse_args(argv, namespace=probe)
  return [
      "/".join(o for a in ap._actions if a.dest == d for o in a.option_strings)
      for d in dests
      if getattr(probe, d) is not unset
  ]


# The flags each mode reads besides its own (with --samples, --workdir names where the report goes, and --phrasing its
# name); every other flag given with that mode would be ignored, so it is refused.
_SAMPLING = ["workdir", "uncond", "out", "step", "steps", "cfg", "num", "seed", "use_ema", "phrasing", "resolution"]
_MODE_READS = {
    "write_prompts": ("phrasing",),
    "validate": ("num", "seed", "phrasing", "resolution"),
    "samples": ("workdir", "phrasing"),
}
_MODE_SAYS = {
    "write_prompts": "--write_prompts writes the prompt set and exits",
    "validate": "--validate scores true renders (no model)",
    "samples": "--samples scores a folder as it is",
}


def _check_mode_flags(ap, args, argv: list[str]) -> None:
  """One argparse error naming the flags the chosen mode would ignore (or the modes given together)."""
  modes = [m for m in _MODE_READS if getattr(args, m)]
  if len(modes) > 1:
    ap.error(f"{' and '.join('--' + m for m in modes)} are separate modes: give one")
  reads = _MODE_READS[modes[0]] if modes else tuple(d for d in _SAMPLING if d != "resolution")
  ignored = [d for d in _SAMPLING if d not in reads]
  if modes == ["samples"] and not args.workdir:  # alone, --phrasing would name nothing
    ignored.append("phrasing")
  given = _given(ap, argv, ignored)
  if not given:
    return
  if modes == ["samples"]:  # every flag it ignores is a sampling flag
    ap.error(
        f"{_MODE_SAYS['samples']}; {', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only when sampling"
    )
  what = _MODE_SAYS[modes[0]] if modes else "sampling a --workdir (--resolution is --validate's)"
  ap.error(f"{what}: it does not read {', '.join(given)}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m iomm_jax.eval_shapes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--workdir", default=None, help="training workdir: sample from its checkpoint, write reports in it")
  add_sampling_flags(ap, num=4, num_help="samples per prompt")
  restore.add_checkpoint_flags(ap)
  ap.add_argument("--out", default=None, help="samples folder (default <workdir>/eval_shapes/samples)")
  ap.add_argument("--uncond", action="store_true", help="sample with the empty prompt (chance-level reference)")
  ap.add_argument(
      "--phrasing",
      choices=shapes_benchmark.PHRASINGS,
      default=shapes_benchmark.PHRASINGS[0],
      help="the prompts in the captions' own grammar, or worded as GenEval words its prompts",
  )
  ap.add_argument("--samples", default=None, help="score this GenEval-layout folder instead of sampling")
  ap.add_argument("--validate", action="store_true", help="score true renders of the prompts (no model)")
  ap.add_argument("--resolution", type=int, default=32, help="with --validate: render resolution")
  ap.add_argument("--write_prompts", default=None, help="write the prompt set as JSONL here and exit")
  args = ap.parse_args(argv)
  check_sampling_flags(ap, args)
  _check_mode_flags(ap, args, sys.argv[1:] if argv is None else argv)
  if args.write_prompts:
    prompts = shapes_benchmark.prompt_set(args.phrasing)
    try:
      geneval_layout.write_prompts(args.write_prompts, prompts)
    except geneval_layout.OutputPathError as e:
      raise SystemExit(f"--write_prompts: {e}") from None
    print(json.dumps({"prompts": len(prompts), "path": args.write_prompts}))
    return 0
  if args.validate:
    if args.resolution < 8:
      ap.error(f"--resolution={args.resolution}: use 8 or more")
    print(json.dumps(shapes_benchmark.validate(args.resolution, num=args.num, seed=args.seed, phrasing=args.phrasing)))
    return 0
  suffix = ("_uncond" if args.uncond else "") + (
      "" if args.phrasing == shapes_benchmark.PHRASINGS[0] else "_" + args.phrasing
  )
  if args.samples:
    if not os.path.isdir(args.samples):
      raise SystemExit(f"--samples={args.samples} is not a folder")
    if args.workdir and not os.path.isfile(workdir_layout.path(args.workdir, workdir_layout.CONFIG)):
      ap.error(
          f"--workdir={args.workdir} is not a training workdir (no config.json); drop it to write the report into "
          "the --samples folder"
      )
    base = (
        workdir_layout.path(args.workdir, workdir_layout.EVAL_SHAPES + suffix)
        if args.workdir
        else workdir_layout.path(args.samples, workdir_layout.EVAL_SHAPES)
    )
    try:
      summary = report(args.samples, base + ".json", base + ".png")
    except ValueError as e:
      raise SystemExit(f"--samples: {e}") from None
    print(json.dumps(summary))
    return 0
  if not args.workdir:
    ap.error("give --workdir (sample and score), --samples=DIR, --validate or --write_prompts")
  out = args.out or os.path.join(args.workdir, workdir_layout.EVAL_SHAPES + suffix, workdir_layout.SAMPLES)
  # The prompt set goes inside the sample folder, the one path the user named: nothing beside it is overwritten.
  own = (geneval_layout.PROMPTS_FILE,)
  try:  # before the model loads: an --out that holds anything but an earlier sample output is never replaced
    geneval_layout.check_out_dir(out, also_own=own)
  except geneval_layout.OutputPathError as e:
    raise SystemExit(f"--out: {e}" if args.out else str(e)) from None
  problem = output_folder.path_problem(
      workdir_layout.path(args.workdir, workdir_layout.EVAL_SHAPES + suffix + ".json"), folder=False
  )
  if problem:
    raise SystemExit(f"eval_shapes: cannot write its report: {problem}")
  import jax

  run, params, step = restore.load_for_inference(args.workdir, step=args.step, use_ema=args.use_ema)
  metadata = shapes_benchmark.prompt_set(args.phrasing)
  base = workdir_layout.path(args.workdir, workdir_layout.EVAL_SHAPES + suffix)
  try:  # the old report goes just before the new samples take their place: a kill after leaves none, not a wrong one
    sample_lib.write_geneval(
        run,
        params,
        metadata,
        out,
        num=args.num,
        rng=jax.random.key(args.seed),
        steps=args.steps,
        cfg_scale=args.cfg,
        prompt_of=(lambda m: "") if args.uncond else None,
        also_own=own,
        reports=(base + ".json", base + ".png"),
        with_prompts=True,
    )
  except geneval_layout.OutputPathError as e:  # something was put in --out while sampling: it is left alone
    raise SystemExit(f"--out: {e}" if args.out else str(e)) from None
  summary = report(
      out,
      base + ".json",
      base + ".png",
      extra={"checkpoint_step": int(step), "uncond": args.uncond, "phrasing": args.phrasing},
  )
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(app_exit.run(main))
