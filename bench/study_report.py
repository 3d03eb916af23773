"""The study runner's outputs: arms.jsonl (one line per arm and scored step), table.md (each arm beside the paper's
figure) and plot.png (bars for recipes and components, curves for the sweeps and for GenEval against fine-tuning
steps). Drawn with PIL, so the study needs nothing beyond the package."""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict

from PIL import Image, ImageDraw

from iomm_jax.shapes_benchmark import CATEGORIES

# The paper's GenEval overall for each arm (its Table 9, Fig. 2b, Fig. 4b/4c; IOMM-XL ablations, full scale).
# None: the paper only plots it.
PAPER = {
    "recipes": {
        "image + image": 0.61,
        "image + pair": 0.87,
        "image + mix": 0.89,
        "pair + image": 0.78,
        "pair + pair": 0.86,
        "pair + mix": 0.88,
    },
    "components": {"raw (no RQA)": 0.44, "+ RQA": 0.82, "+ RQA + masking": 0.88, "MetaQuery queries": 0.82},
    "mask_ratio": {"r = 0.45": 0.88, "r = 0.95": 0.77},
    "mix_ratio": {"λ = 0.1": 0.85, "λ = 0.3": 0.85, "λ = 0.5": 0.86, "λ = 0.7": 0.84, "λ = 0.9": 0.78},  # at 10k steps
}


def _spread(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(study: str, rows: list[dict]) -> str:
  """Markdown: one line per arm at its last fine-tuning step (mean ± sd over seeds), the paper's overall beside."""
  final = max(r["finetune_steps"] for r in rows)
  by_arm: dict[str, list[dict]] = defaultdict(list)
  for r in rows:
    if r["finetune_steps"] == final:
      by_arm[r["arm"]].append(r)
  cats = [c for c in CATEGORIES if any(c in r["geneval"] for r in rows)]
  head = ["arm", *cats, "overall", "recon margin", "recon top-1", "paper overall"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for arm, rs in by_arm.items():
    cells = [arm]
    cells += [_spread([r["geneval"].get(c, float("nan")) for r in rs]) for c in cats]
    cells.append(_spread([r["geneval"].get("overall", float("nan")) for r in rs]))
    cells.append(_spread([r["recon"].get("margin", float("nan")) for r in rs]))
    cells.append(_spread([r["recon"].get("top1_retrieval", float("nan")) for r in rs]))
    paper = PAPER.get(study, {}).get(arm)
    cells.append("–" if paper is None else f"{paper:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  seeds = sorted({r["seed"] for r in rows})
  lines.append("")
  lines.append(
      f"Fine-tuning steps {final}; seeds {seeds}; mini-GenEval chance overall "
      f"{rows[0].get('geneval_chance', {}).get('overall', float('nan')):.2f}."
  )
  return "\n".join(lines) + "\n"


def _ascii(label: str) -> str:
  return label.replace("λ", "lambda")  # PIL's built-in font has no Greek


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot(study: str, rows: list[dict], path: str, size=(720, 420)) -> str:
  """Bars (one per arm, overall at the last step) or curves (overall against the swept value, or against the
  fine-tuning step per arm when several steps were scored). PIL only; axes 0–1. Returns which: bars|values|steps."""
  w, h = size
  img = Image.new("RGB", size, "white")
  d = ImageDraw.Draw(img)
  left, right, top, bottom = 60, w - 20, 30, h - 70
  d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
  for k in range(6):
    y = bottom - (bottom - top) * k / 5
    d.line([(left - 4, y), (left, y)], fill="black")
    d.text((left - 34, y - 6), f"{k / 5:.1f}", fill="black")
  final = max(r["finetune_steps"] for r in rows)
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  steps = sorted({r["finetune_steps"] for r in rows})
  note = " against fine-tuning steps" if len(steps) > 1 else " (the paper's figures in grey)"
  d.text((left, 8), f"{study}: mini-GenEval overall{note}", fill="black")
  y_of = lambda v: bottom - (bottom - top) * max(0.0, min(1.0, v))  # noqa: E731
  values = [r.get("value") for r in rows]
  if len(steps) == 1 and all(isinstance(v, (int, float)) for v in values) and len(set(values)) > 1:
    mode = "values"  # a sweep scored once: overall against the swept value (Fig. 4b), the paper's points in grey
    lo, hi = min(values), max(values)
    x_of = lambda v: left + 20 + (right - left - 40) * (v - lo) / (hi - lo)  # noqa: E731
    swept = sorted(set(values))
    for v in swept:
      d.text((x_of(v) - 12, bottom + 6), f"{v:g}", fill="black")
    d.text(((left + right) // 2 - 40, bottom + 24), "swept value", fill="black")
    pts = [(x_of(v), y_of(statistics.mean(r["geneval"]["overall"] for r in rows if r["value"] == v))) for v in swept]
    d.line(pts, fill=COLOURS[0], width=2)
    for p in pts:
      d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=COLOURS[0])
    for r in rows:
      paper = PAPER.get(study, {}).get(r["arm"])
      if paper is not None:
        x, y = x_of(r["value"]), y_of(paper)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(120, 120, 120), width=2)
  elif len(steps) > 1:
    mode = "steps"  # GenEval against fine-tuning steps, one curve per arm
    x_of = lambda s: left + (right - left) * (steps.index(s) + 0.5) / len(steps)  # noqa: E731
    for s in steps:
      d.text((x_of(s) - 12, bottom + 6), str(s), fill="black")
    d.text(((left + right) // 2 - 50, bottom + 24), "fine-tuning steps", fill="black")
    for i, arm in enumerate(arms):
      pts = [
          (
              x_of(s),
              y_of(
                  statistics.mean(r["geneval"]["overall"] for r in rows if r["arm"] == arm and r["finetune_steps"] == s)
              ),
          )
          for s in steps
      ]
      d.line(pts, fill=COLOURS[i % len(COLOURS)], width=2)
      for p in pts:
        d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=COLOURS[i % len(COLOURS)])
      d.text((right - 130, top + 14 * i), _ascii(arm), fill=COLOURS[i % len(COLOURS)])
  else:  # bars at the final step
    mode = "bars"
    slot = (right - left) / max(1, len(arms))
    for i, arm in enumerate(arms):
      vals = [r["geneval"]["overall"] for r in rows if r["arm"] == arm and r["finetune_steps"] == final]
      x0 = left + slot * i + slot * 0.15
      x1 = left + slot * (i + 1) - slot * 0.15
      d.rectangle([x0, y_of(statistics.mean(vals)), x1, bottom], fill=COLOURS[i % len(COLOURS)])
      paper = PAPER.get(study, {}).get(arm)
      if paper is not None:
        d.line([(x0 - 4, y_of(paper)), (x1 + 4, y_of(paper))], fill=(120, 120, 120), width=3)
      d.text((x0, bottom + 6 + 12 * (i % 2)), _ascii(arm), fill="black")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return mode


def write(out: str, study: str, rows: list[dict]) -> dict:
  """arms.jsonl, table.md and plot.png in `out`; returns their paths."""
  os.makedirs(out, exist_ok=True)
  paths = {k: os.path.join(out, n) for k, n in (("jsonl", "arms.jsonl"), ("table", "table.md"), ("plot", "plot.png"))}
  with open(paths["jsonl"], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(paths["table"], "w") as f:
    f.write(table(study, rows))
  plot(study, rows, paths["plot"])
  return paths
