"""Evaluation of a ControlNet trained on shapes masks (``python -m train.eval`` of a controlnet run).

Three measurements (docs/CONTROLNET.md):

* ``mask_following``: the mask of every shape x position x size (30, no jitter) with prompts that
  name only a colour ("a red shape", all six colours): IoU between the control mask and the
  generated shape's mask (pixels whose brightest channel exceeds 0.5), and the colour read back by
  the shapes analyzer. Also the shape, size and position the analyzer reads against the mask's.
* ``prompt_against_mask``: a mask of one shape with a full caption naming another shape (same
  colour, size and position) at each conditioning scale: how often the generated shape is the
  mask's, the prompt's, or neither.
* ``qr_patterns``: random binary 4x4 grids (seeds apart from the training patterns) as control
  with "a {colour} pattern": per-cell agreement of the thresholded luminance (a cell is on when
  most of its pixels are bright) with the grid, and the colour of the bright pixels.
PNG grids: control | sample rows for each.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxgen.data import shapes
from jaxgen.eval.images import make_grid, save_png

EVAL_SEED = 0
QR_SEED = 98765            # not the training patterns' seed
ON = 0.5                   # a pixel is "on" when its brightest channel exceeds this


def bright_masks(images: np.ndarray) -> np.ndarray:
    """bool [N, H, W]: the brightest channel of uint8 images above ON."""
    return np.asarray(images).max(-1) > ON * 255


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image intersection over union of bool masks [N, H, W] (1 where both are empty)."""
    inter = (a & b).sum((1, 2))
    union = (a | b).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mask_cases() -> dict[str, np.ndarray]:
    """Every shape x size x position drawn without jitter, white on black: {"mask": uint8
    [30, 32, 32, 1], "shape", "size", "position": int32 [30]}."""
    rows = [(s, z, p) for s in range(len(shapes.SHAPES)) for z in range(len(shapes.SIZES))
            for p in range(len(shapes.POSITIONS))]
    images = np.stack([shapes.draw_shape(s, "red", z, p) for s, z, p in rows])
    return {"mask": shapes.shape_masks(images), **{k: np.asarray(v, np.int32) for k, v in
                                                   zip(("shape", "size", "position"), zip(*rows))}}


def cell_agreement(images: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """float [N]: the fraction of cells whose majority brightness (on / off) equals grid [N, k, k]."""
    n, k = grid.shape[0], grid.shape[1]
    on = bright_masks(images).reshape(n, k, images.shape[1] // k, k, images.shape[2] // k)
    cells = on.mean((2, 4)) > 0.5
    return (cells == grid).mean((1, 2))


def _color_of_bright(images: np.ndarray) -> np.ndarray:
    """int [N]: the palette colour nearest the mean hue of each image's bright pixels (-1: none)."""
    m = bright_masks(images).astype(np.float32)
    count = m.sum((1, 2))
    rgb = np.einsum("nhwc,nhw->nc", images.astype(np.float32) / 255.0, m) / np.maximum(count, 1)[:, None]
    hue = rgb / np.maximum(rgb.max(1, keepdims=True), 1e-6)
    palette = shapes.COLOR_RGB.astype(np.float32) / 255.0
    color = np.argmin(((hue[:, None] - palette[None]) ** 2).sum(-1), 1)
    return np.where(count > 0, color, -1)


def evaluate(run, out_dir: str, eval_cfg=None) -> dict[str, Any]:
    """The three measurements of the module docstring for a controlnet ``run``; PNGs into out_dir."""
    per = int(eval_cfg.samples_per_mask) if eval_cfg is not None else 1
    scales = tuple(float(s) for s in (eval_cfg.scales if eval_cfg is not None else (0.5, 1.0, 1.5)))
    num_patterns = int(eval_cfg.patterns) if eval_cfg is not None else 60
    os.makedirs(out_dir, exist_ok=True)
    out: dict[str, Any] = {}

    # 1. masks of every shape, position and size, prompts naming a colour only
    cases = mask_cases()
    m = len(cases["mask"])
    colors = np.repeat(np.arange(len(shapes.COLORS)), m * per)                     # [6 m per]
    which = np.tile(np.repeat(np.arange(m), per), len(shapes.COLORS))
    control = cases["mask"][which]
    prompts = [f"a {shapes.COLORS[c]} shape" for c in colors]
    images = run.sample(len(prompts), prompts=prompts, control=control, seed=EVAL_SEED)
    read = shapes.analyze(images)
    ious = iou(bright_masks(images), control[..., 0] > 127)
    out["mask_following"] = {
        "samples": len(prompts),
        "iou_mean": float(ious.mean()), "iou_at_least_0.85": float((ious >= 0.85).mean()),
        "color": float((read["color"] == colors).mean()),
        "shape_of_mask": float((read["shape"] == cases["shape"][which]).mean()),
        "size_of_mask": float((read["size"] == cases["size"][which]).mean()),
        "position_of_mask": float((read["position"] == cases["position"][which]).mean()),
    }
    out["target_iou_0.85_met"] = bool(out["mask_following"]["iou_mean"] >= 0.85)
    out["target_color_0.9_met"] = bool(out["mask_following"]["color"] >= 0.9)
    first = [int(np.flatnonzero((colors == c) & (which == j))[0]) for c in range(len(shapes.COLORS))
             for j in range(0, m, 3)]
    save_png(os.path.join(out_dir, "controlnet_masks.png"),
             make_grid(np.concatenate([np.repeat(control[first[:10]], 3, -1), images[first]]), ncol=10, upscale=2))

    # 2. a mask of one shape, a prompt naming another, at each conditioning scale
    rows = [(s, t, z, p) for s in range(3) for t in range(3) if s != t for z in range(2) for p in range(5)]
    masks = cases["mask"][[s * 10 + z * 5 + p for s, _, z, p in rows]]
    color_ids = np.arange(len(rows)) % len(shapes.COLORS)
    prompts = [shapes.caption(t, int(c), z, p) for (s, t, z, p), c in zip(rows, color_ids)]
    mask_shape = np.asarray([s for s, _, _, _ in rows])
    prompt_shape = np.asarray([t for _, t, _, _ in rows])
    out["prompt_against_mask"] = {}
    grids = []
    for scale in scales:
        imgs = run.sample(len(prompts), prompts=prompts, control=masks, seed=EVAL_SEED, conditioning_scale=scale)
        got = shapes.analyze(imgs)["shape"]
        out["prompt_against_mask"][str(scale)] = {
            "mask_wins": float((got == mask_shape).mean()), "prompt_wins": float((got == prompt_shape).mean()),
            "neither": float(((got != mask_shape) & (got != prompt_shape)).mean()),
            "iou_with_mask": float(iou(bright_masks(imgs), masks[..., 0] > 127).mean())}
        grids.append(imgs[:12])
    save_png(os.path.join(out_dir, "controlnet_prompt_vs_mask.png"),
             make_grid(np.concatenate([np.repeat(masks[:12], 3, -1), *grids]), ncol=12, upscale=2))

    # 3. the QR exercise: random grids, "a {colour} pattern"
    pat = shapes.grid_patterns(num_patterns, QR_SEED, cells=4)
    prompts = [f"a {shapes.COLORS[c]} pattern" for c in pat["color"]]
    imgs = run.sample(num_patterns, prompts=prompts, control=pat["mask"], seed=EVAL_SEED)
    agree = cell_agreement(imgs, pat["grid"])
    out["qr_patterns"] = {"patterns": num_patterns, "cell_agreement_mean": float(agree.mean()),
                          "patterns_at_least_0.9": float((agree >= 0.9).mean()),
                          "color": float((_color_of_bright(imgs) == pat["color"]).mean())}
    out["target_qr_0.9_met"] = bool(agree.mean() >= 0.9)
    k = min(12, num_patterns)
    save_png(os.path.join(out_dir, "controlnet_qr.png"),
             make_grid(np.concatenate([np.repeat(pat["mask"][:k], 3, -1), imgs[:k]]), ncol=k, upscale=2))
    return out
