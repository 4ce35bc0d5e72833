"""An independent renderer of spec-conforming shapes images, for evaluation.

Written from DESIGN.md section 4 alone, not from ``shapes.draw_shape``: a 32x32 RGB image on
black with one filled shape in a pure colour, no rotation, no anti-aliasing. Here the shape is a
continuous figure in pixel coordinates (pixel (i, j) covers [i, i + 1] x [j, j + 1]):

- circle: the disc of diameter ``width`` centred on ``center``;
- square: the axis-aligned square of side ``width`` centred on ``center``;
- triangle: upright, apex at the top middle and flat base at the bottom of the ``width x width``
  box centred on ``center`` (base ``width``, height ``width``).

A pixel is filled when more than ``coverage`` of its ``supersample x supersample`` sub-samples
lie inside the figure (coverage thresholding: hard edges, no blending), so centres and widths can
be anywhere on a continuum: the spec's jitter is +-2 px on each axis of the centre and +-1 px on
the width. ``render`` refuses a figure that would leave the canvas; ``independent_split`` draws
centres from the jitter range clipped so that every figure fits.

The generator (``shapes.draw_shape``) draws integer widths and centres with its own pixel
tests; models trained on its images only can key on its edge pixels. Evaluating on these renders
(``python -m train.eval`` of a shapes CLIP run, the analyzer's tests) measures what holds on any
image the spec allows.
"""
from __future__ import annotations

import numpy as np

from jaxgen.data.shapes import (ATTRIBUTES, COLOR_RGB, IMAGE_SIZE, NUM_COMBINATIONS, POSITION_CENTERS,
                                POSITION_JITTER, SIZE_JITTER, SIZE_PIXELS, _attribute_id, caption,
                                combination_attributes)
from jaxgen.errors import DataError

_FIT_EPS = 1e-6  # slack when checking that a figure lies inside the canvas


def _inside(shape: int, x: np.ndarray, y: np.ndarray, cx: float, cy: float, width: float) -> np.ndarray:
    """bool, same shape as x and y: the points (x, y) lie inside the figure."""
    half = width / 2
    dx, dy = x - cx, y - cy
    if shape == 0:  # circle
        return dx * dx + dy * dy <= half * half
    in_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == 1:  # square
        return in_box
    # triangle: the half-width grows linearly from 0 at the apex (dy = -half) to half at the base
    return in_box & (np.abs(dx) <= (dy + half) / 2)


def render(shape, color, size, position, *, center=None, width=None, supersample: int = 4,
           coverage: float = 0.5) -> np.ndarray:
    """Draw one image of a combination with sub-pixel geometry.

    shape, color, size, position: names or int ids (as ``shapes.caption``).
    center: (x, y) float px, within POSITION_JITTER (2) px of the position's centre on each axis
      (default: the position's centre). width: float px, within SIZE_JITTER (1) px of the size's
      width (default: the size's width). supersample: sub-samples per pixel and axis (>= 1).
      coverage: fraction of a pixel's sub-samples, in [0, 1), that must lie inside the figure
      for it to be filled (strictly more).
    Returns uint8 [32, 32, 3]: black, the shape's pixels in the pure colour (values 0 or 255).
    """
    s, c, z, p = (_attribute_id(v, a) for v, a in zip((shape, color, size, position), ATTRIBUTES))
    nx, ny = POSITION_CENTERS[p]
    cx, cy = (float(nx), float(ny)) if center is None else (float(center[0]), float(center[1]))
    w = float(SIZE_PIXELS[z]) if width is None else float(width)
    if max(abs(cx - nx), abs(cy - ny)) > POSITION_JITTER + _FIT_EPS:
        raise DataError(f"center ({cx}, {cy}) is more than {POSITION_JITTER} px from the "
                        f"{position!r} centre {(nx, ny)}; pass a centre within the spec's jitter.")
    if abs(w - SIZE_PIXELS[z]) > SIZE_JITTER + _FIT_EPS:
        raise DataError(f"width {w} is more than {SIZE_JITTER} px from the {size!r} width "
                        f"{SIZE_PIXELS[z]}; pass a width within the spec's jitter.")
    if min(cx, cy) - w / 2 < -_FIT_EPS or max(cx, cy) + w / 2 > IMAGE_SIZE + _FIT_EPS:
        raise DataError(f"a {w} px figure centred on ({cx}, {cy}) leaves the {IMAGE_SIZE} px canvas; "
                        "move its centre inwards (fit_center gives the nearest one that fits).")
    if isinstance(supersample, bool) or not isinstance(supersample, (int, np.integer)) or supersample < 1:
        raise DataError(f"supersample={supersample!r}: use an int >= 1 (sub-samples per pixel and axis).")
    if not 0.0 <= float(coverage) < 1.0:
        raise DataError(f"coverage={coverage!r}: use a fraction in [0, 1).")
    k = int(supersample)
    sub = (np.arange(IMAGE_SIZE * k) + 0.5) / k          # sub-sample coordinates along one axis
    inside = _inside(s, sub[None, :], sub[:, None], cx, cy, w)                     # [32k, 32k] (y, x)
    frac = inside.reshape(IMAGE_SIZE, k, IMAGE_SIZE, k).mean((1, 3))              # [32, 32]
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[frac > coverage] = COLOR_RGB[c]
    return image


def fit_center(center, width: float) -> tuple[float, float]:
    """The centre nearest to ``center`` (x, y) at which a ``width`` px figure lies inside the canvas."""
    lo, hi = width / 2, IMAGE_SIZE - width / 2
    return tuple(float(min(max(v, lo), hi)) for v in center)


def independent_split(num: int, seed: int, *, supersample: int = 4, coverage: float = 0.5) -> dict:
    """``num`` independent renders cycling through all 180 combinations (example j shows
    combination j % 180, so every combination is equally frequent to within one).

    Each example's width is uniform in [w - 1, w + 1] and its centre uniform in the +-2 px square
    around its position's centre, clipped to where the figure fits in the canvas (``fit_center``);
    both drawn from numpy's default_rng(seed).
    Returns {"image": uint8 [num, 32, 32, 3], "label": int32 [num] combination index,
    "shape"/"color"/"size"/"position": int32 [num] ids, "center": float32 [num, 2] (x, y),
    "width": float32 [num], "caption": list of num canonical captions}.
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise DataError(f"num={num!r}: ask for a number of images >= 0.")
    rng = np.random.default_rng(int(seed))
    labels = (np.arange(num) % NUM_COMBINATIONS).astype(np.int32)
    attrs = combination_attributes(labels) if num else {a: np.zeros((0,), np.int32) for a in ATTRIBUTES}
    base = np.asarray(SIZE_PIXELS, np.float64)[attrs["size"]]
    widths = base + rng.uniform(-SIZE_JITTER, SIZE_JITTER, num)
    nominal = np.asarray(POSITION_CENTERS, np.float64)[attrs["position"]].reshape(num, 2)
    centers = nominal + rng.uniform(-POSITION_JITTER, POSITION_JITTER, (num, 2))
    images = np.zeros((num, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    texts = []
    for j in range(num):
        args = [int(attrs[a][j]) for a in ATTRIBUTES]
        centers[j] = fit_center(centers[j], widths[j])
        images[j] = render(*args, center=centers[j], width=widths[j], supersample=supersample, coverage=coverage)
        texts.append(caption(*args))
    return {"image": images, "label": labels, **{a: np.asarray(v, np.int32) for a, v in attrs.items()},
            "center": centers.astype(np.float32), "width": widths.astype(np.float32), "caption": texts}


GEOMETRIES = ("grid", "continuous")  # shapes load option geometry=: the generator's, or continuous_split


def continuous_split(split: str, num: int | None = None, seed: int = 0) -> dict:
    """A shapes split with continuous geometry within the spec, for training that generalises
    beyond one rasteriser (the ``geometry="continuous"`` option of ``load_dataset("shapes")``).

    Example j shows combination ``shapes.split_combinations(split)[j % n]`` (held-out
    combinations stay out of train and test). Even j: the generator (``shapes.draw_shape``) with
    integer jitter, uniform over its range; odd j: ``render`` by pixel-centre sampling
    (supersample=1, coverage=0) at a width uniform in [w - 1, w + 1] and a centre uniform in the
    +-2 px square, clipped to fit (``fit_center``). This is deliberately not the area-coverage
    rasterisation (supersample=4, coverage=0.5) ``independent_split`` evaluates on. Draws from
    numpy's default_rng([seed, split index, 1]); num defaults to
    ``shapes.DEFAULT_NUM_EXAMPLES[split]``.
    Returns generate_split's keys but "jitter" ({"image", "label", "shape", "color", "size",
    "position", "caption"}) plus "center" float32 [N, 2] and "width" float32 [N] (the generator's
    box centre and width on even rows).
    """
    from jaxgen.data.shapes import DEFAULT_NUM_EXAMPLES, SPLITS, draw_shape, split_combinations

    combos = split_combinations(split)
    n = DEFAULT_NUM_EXAMPLES[split] if num is None else num
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(f"num={num!r}: ask for a number of examples >= 0.")
    rng = np.random.default_rng([int(seed), SPLITS.index(split), 1])
    labels = np.asarray([combos[j % len(combos)] for j in range(n)], np.int32)
    attrs = combination_attributes(labels) if n else {a: np.zeros((0,), np.int32) for a in ATTRIBUTES}
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    centers = np.zeros((n, 2), np.float32)
    widths = np.zeros((n,), np.float32)
    texts = []
    for j in range(n):
        args = [int(attrs[a][j]) for a in ATTRIBUTES]
        base = SIZE_PIXELS[args[2]]
        nominal = np.asarray(POSITION_CENTERS[args[3]], np.float64)
        if j % 2 == 0:
            dsize = int(rng.integers(-SIZE_JITTER, SIZE_JITTER + 1))
            dx, dy = (int(v) for v in rng.integers(-POSITION_JITTER, POSITION_JITTER + 1, 2))
            images[j] = draw_shape(*args, jitter=(dsize, dx, dy))
            on = images[j].max(-1) > 0
            ys, xs = np.nonzero(on)
            widths[j] = base + dsize
            centers[j] = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
        else:
            widths[j] = base + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
            centers[j] = fit_center(nominal + rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2), widths[j])
            images[j] = render(*args, center=centers[j], width=widths[j], supersample=1, coverage=0.0)
        texts.append(caption(*args))
    return {"image": images, "label": labels, **{a: np.asarray(v, np.int32) for a, v in attrs.items()},
            "center": centers, "width": widths, "caption": texts}
