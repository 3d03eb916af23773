"""Object detector for images of the procedural shapes world (`iomm_jax.data.shapes`).

  python -m iomm_jax.shapes_detector [--resolution 32 48 64]   # accuracy on held-out dataset renders

Colour segmentation against the plain light background: every pixel is modelled as a blend
`bg + alpha * (palette colour - bg)` (antialiased edges are exactly such blends), takes the palette colour whose blend
line is nearest, and counts as that colour where alpha >= 0.5 and the distance to the line is small. Each colour's
8-connected components, filtered by size, are objects. Their shape comes from a small numpy MLP on scale-normalised
features of the soft coverage map (normalised central moments + a 12x12 resampled patch), fitted on first use per
resolution on single-object renders, half of them blurred and noised like generated samples, with a fixed seed
(1–3 s; cached in memory), so it is deterministic and needs no stored weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import numpy as np
from PIL import Image, ImageFilter

from iomm_jax.data import shapes

COLOUR_NAMES = tuple(shapes.COLOURS)
_PALETTE = np.array([shapes.COLOURS[c] for c in COLOUR_NAMES], np.float64)
_TOL = 48.0  # max RGB distance from a colour's blend line (generated samples are noisy)
_MIN_AREA = 0.003  # components covering less of the image are specks, not objects (smallest object ≈ 0.008)
_MAX_AREA = 0.5  # larger ones are coloured backgrounds (largest object ≈ 0.33)
_GRID = np.linspace(-1.2, 1.2, 12)  # patch sample points, in units of sqrt(object area)
_FIT_SEED = 20240531
_FIT_NUM = 1200  # training renders per resolution (200 per shape)
_DEGRADED = 0.5  # fraction of them blurred (up to 1 px at 32²) and noised (sigma up to 10)


@dataclasses.dataclass(frozen=True)
class Detection:
  """One object: palette colour, shape, centre (x right, y down) and size, all normalised to the image side."""

  colour: str
  shape: str
  x: float
  y: float
  w: float  # bounding box of the alpha >= 0.5 pixels
  h: float
  area: float  # soft coverage as a fraction of the image
  score: float  # classifier probability of `shape`

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def background(img: np.ndarray) -> np.ndarray:
  """Background colour estimate: per-channel median of the border pixels (objects never touch the border)."""
  img = np.asarray(img, np.float64)
  border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
  return np.median(border, axis=0)


def colour_maps(img: np.ndarray, bg: np.ndarray | None = None):
  """(label (H, W) int: palette index or -1, alpha (H, W, 7), fits (H, W, 7) bool: pixel on that colour's line)."""
  img = np.asarray(img, np.float64)
  bg = background(img) if bg is None else bg
  d = _PALETTE - bg
  p = img - bg
  alpha = (np.einsum("hwc,kc->hwk", p, d) / np.maximum((d * d).sum(-1), 1e-6)).clip(0.0, 1.0)
  res = np.linalg.norm(p[..., None, :] - alpha[..., None] * d, axis=-1)
  k = res.argmin(-1)
  a = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
  r = np.take_along_axis(res, k[..., None], -1)[..., 0]
  label = np.where((a >= 0.5) & (r <= _TOL), k, -1)
  return label, alpha, res <= _TOL


def dominant_colour(img: np.ndarray) -> str | None:
  """The palette colour covering the most pixels (None on an empty background): a shape-blind reading of colour."""
  label = colour_maps(img)[0]
  counts = np.bincount(label[label >= 0], minlength=len(COLOUR_NAMES))
  return COLOUR_NAMES[int(counts.argmax())] if counts.sum() else None


def components(mask: np.ndarray) -> list[np.ndarray]:
  """8-connected components of a bool mask, each as an (n, 2) array of (y, x), in scan order of their first pixel."""
  todo = set(zip(*(c.tolist() for c in np.nonzero(mask))))
  out = []
  for start in sorted(todo):
    if start not in todo:
      continue
    todo.remove(start)
    stack, comp = [start], [start]
    while stack:
      y, x = stack.pop()
      for q in (
          (y - 1, x - 1),
          (y - 1, x),
          (y - 1, x + 1),
          (y, x - 1),
          (y, x + 1),
          (y + 1, x - 1),
          (y + 1, x),
          (y + 1, x + 1),
      ):
        if q in todo:
          todo.remove(q)
          stack.append(q)
          comp.append(q)
    out.append(np.array(comp, np.int64))
  return out


def _dilate(m: np.ndarray) -> np.ndarray:
  o = m.copy()
  o[1:] |= m[:-1]
  o[:-1] |= m[1:]
  o2 = o.copy()
  o2[:, 1:] |= o[:, :-1]
  o2[:, :-1] |= o[:, 1:]
  return o2


def _features(a: np.ndarray) -> tuple[np.ndarray, float, float, float]:
  """(features, cx, cy, m00) of one object's soft coverage map `a` (H, W); pixel centres at +0.5."""
  yy, xx = np.nonzero(a)
  top, left = int(yy.min()), int(xx.min())
  a = a[top : int(yy.max()) + 1, left : int(xx.max()) + 1]  # only the object's box: a is zero elsewhere
  h, w = a.shape
  m00 = float(a.sum())
  ys, xs = np.mgrid[0:h, 0:w] + 0.5
  cx, cy = float((a * xs).sum() / m00), float((a * ys).sum() / m00)
  dx, dy = xs - cx, ys - cy
  # Scale-invariant central moments; shapes are never rotated, so no rotation invariance is wanted.
  moments = [
      (a * dx**p * dy**q).sum() / m00 ** (1 + (p + q) / 2) for p in range(5) for q in range(5) if 2 <= p + q <= 4
  ]
  s = np.sqrt(m00)
  u, v = np.meshgrid(_GRID, _GRID)
  px, py = cx + s * u - 0.5, cy + s * v - 0.5
  x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
  fx, fy = px - x0, py - y0

  def at(yy, xx):
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    return np.where(ok, a[yy.clip(0, h - 1), xx.clip(0, w - 1)], 0.0)

  patch = (
      at(y0, x0) * (1 - fx) * (1 - fy)
      + at(y0, x0 + 1) * fx * (1 - fy)
      + at(y0 + 1, x0) * (1 - fx) * fy
      + at(y0 + 1, x0 + 1) * fx * fy
  )
  return np.concatenate([np.array(moments) * 10.0, patch.ravel()]), cx + left, cy + top, m00


def _objects(img: np.ndarray):
  """Yields (colour index, soft map, bool component mask) for every size-filtered component."""
  label, alpha, fits = colour_maps(img)
  h, w = label.shape
  for k in range(len(COLOUR_NAMES)):
    mask = label == k
    if not mask.any():
      continue
    for comp in components(mask):
      cm = np.zeros_like(mask)
      cm[comp[:, 0], comp[:, 1]] = True
      a = alpha[..., k] * fits[..., k] * _dilate(cm)  # the partly covered rim carries the sub-pixel shape
      if _MIN_AREA * h * w <= a.sum() <= _MAX_AREA * h * w:
        yield k, a, cm


class _MLP:
  """One hidden layer, softmax output; minibatch Adam in float64 from a fixed seed.

  Minibatches of 48 keep every matmul under OpenBLAS's threading threshold: full-batch products start threads that
  spin against other jobs on a loaded 2-core machine (measured 10× slower).
  """

  def __init__(
      self,
      x: np.ndarray,
      y: np.ndarray,
      *,
      hidden: int = 32,
      epochs: int = 60,
      batch: int = 48,
      lr: float = 0.003,
      seed: int = 0,
  ):
    self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
    xn = (x - self.mu) / self.sd
    rng = np.random.default_rng(seed)
    n, d = xn.shape
    k = int(y.max()) + 1
    params = [
        rng.normal(0, d**-0.5, (d, hidden)),
        np.zeros(hidden),
        rng.normal(0, hidden**-0.5, (hidden, k)),
        np.zeros(k),
    ]
    onehot = np.eye(k)[y]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t = 0
    for _ in range(epochs):
      order = rng.permutation(n)
      for start in range(0, n - batch + 1, batch):
        t += 1
        idx = order[start : start + batch]
        xb = xn[idx]
        w1, b1, w2, b2 = params
        hid = np.maximum(xb @ w1 + b1, 0.0)
        g = (self._softmax(hid @ w2 + b2) - onehot[idx]) / batch
        gh = (g @ w2.T) * (hid > 0)
        grads = [xb.T @ gh + 1e-4 * w1, gh.sum(0), hid.T @ g + 1e-4 * w2, g.sum(0)]
        for i, gr in enumerate(grads):
          m[i] = 0.9 * m[i] + 0.1 * gr
          v[i] = 0.999 * v[i] + 0.001 * gr * gr
          params[i] -= lr * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
    self.params = params

  @staticmethod
  def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  def proba(self, x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = self.params
    return self._softmax(np.maximum(((x - self.mu) / self.sd) @ w1 + b1, 0.0) @ w2 + b2)


def _training_set(resolution: int, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Features of `num` single-object renders (shapes in turn, radii 0.06–0.34: the dataset's range and a bit more)."""
  rng = np.random.default_rng([seed, resolution])
  xs, ys = [], []
  for i in range(num):
    s = i % len(shapes.SHAPES)
    r = 0.06 + 0.28 * rng.uniform() ** 2  # denser at small sizes, where the shapes are hardest to tell apart
    x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
    bg = rng.uniform(205, 250, size=3).astype(int)
    k = int(rng.integers(len(COLOUR_NAMES)))
    img = shapes.render_objects(
        [dict(shape=shapes.SHAPES[s], colour=COLOUR_NAMES[k], x=x, y=y, r=r)], resolution, tuple(bg)
    )
    if rng.uniform() < _DEGRADED:  # generated samples are softer and noisier than renders
      radius = rng.uniform(0.0, 1.0) * resolution / 32
      img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)), np.float64)
      img = np.clip(img + rng.normal(0.0, rng.uniform(0.0, 10.0), img.shape), 0, 255).round().astype(np.uint8)
    # The same maps as detection, but only the known colour's (7× cheaper than the full colour_maps).
    p = img.astype(np.float64) - background(img)
    d = _PALETTE[k] - background(img)
    alpha = (p @ d / max(float(d @ d), 1e-6)).clip(0.0, 1.0)
    fits = np.linalg.norm(p - alpha[..., None] * d, axis=-1) <= _TOL
    a = alpha * fits * _dilate((alpha >= 0.5) & fits)
    xs.append(_features(a)[0])
    ys.append(s)
  return np.stack(xs), np.array(ys)


class Detector:
  """Detector for one image resolution; build with :func:`get` (fitted once per resolution and cached)."""

  def __init__(self, resolution: int, seed: int = _FIT_SEED, num: int = _FIT_NUM):
    self.resolution = int(resolution)
    x, y = _training_set(self.resolution, num, seed)
    self.model = _MLP(x, y, seed=seed & 0xFFFF)

  def detect(self, img: np.ndarray) -> list[Detection]:
    """Objects in a uint8 (H, W, 3) image, largest first."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
      raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    h, w = img.shape[:2]
    found, feats = [], []
    for k, a, cm in _objects(img):
      f, cx, cy, m00 = _features(a)
      yy, xx = np.nonzero(cm)
      found.append((k, cx / w, cy / h, (xx.max() - xx.min() + 1) / w, (yy.max() - yy.min() + 1) / h, m00 / (h * w)))
      feats.append(f)
    if not found:
      return []
    prob = self.model.proba(np.stack(feats))
    out = [
        Detection(
            colour=COLOUR_NAMES[k],
            shape=shapes.SHAPES[int(p.argmax())],
            x=x,
            y=y,
            w=bw,
            h=bh,
            area=ar,
            score=float(p.max()),
        )
        for (k, x, y, bw, bh, ar), p in zip(found, prob)
    ]
    return sorted(out, key=lambda d: -d.area)


@functools.lru_cache(maxsize=None)
def get(resolution: int) -> Detector:
  """The detector fitted for `resolution` (cached for the process)."""
  return Detector(resolution)


def detect(img: np.ndarray) -> list[Detection]:
  """Objects in a square uint8 image, with the detector fitted for its side."""
  return get(int(np.asarray(img).shape[0])).detect(img)


def accuracy(resolution: int, num: int = 300, seed: int = 7) -> dict:
  """Detector accuracy on `num` dataset renders never used for fitting (`shapes.render(i, resolution, seed)`).

  Per ground-truth object: a detection of its colour within its radius of its centre (`colour`), and that
  detection's shape (`shape`); per image: the detected (colour, shape) multiset is exactly the truth (`image_exact`).
  """
  det = get(resolution)
  n_obj = colour_ok = shape_ok = exact = 0
  for i in range(num):
    img, _ = shapes.render(i, resolution, seed)
    truth = shapes.scene(i, seed)["objects"]
    found = det.detect(img)
    n_obj += len(truth)
    for o in truth:
      near = [d for d in found if d.colour == o["colour"] and np.hypot(d.x - o["x"], d.y - o["y"]) <= o["r"]]
      colour_ok += bool(near)
      shape_ok += bool(near) and near[0].shape == o["shape"]
    exact += sorted((d.colour, d.shape) for d in found) == sorted((o["colour"], o["shape"]) for o in truth)
  return {
      "resolution": resolution,
      "images": num,
      "objects": n_obj,
      "colour": colour_ok / n_obj,
      "shape": shape_ok / n_obj,
      "image_exact": exact / num,
  }


def main(argv=None) -> int:
  import argparse
  import time

  ap = argparse.ArgumentParser(
      prog="python -m iomm_jax.shapes_detector",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument("--resolution", type=int, nargs="+", default=[32, 48, 64])
  ap.add_argument("--num", type=int, default=300, help="held-out renders per resolution")
  args = ap.parse_args(argv)
  for res in args.resolution:
    t = time.perf_counter()
    get(res)
    fit_s = time.perf_counter() - t
    print(json.dumps({**accuracy(res, args.num), "fit_s": round(fit_s, 2)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
