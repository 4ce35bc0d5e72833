"""Evaluation of a shapes upscaler (``python -m train.eval`` of an upscale run; docs/UPSCALE.md).

* ``reconstruction``: test-split images (never trained on) downsampled by the autoencoder's factor
  (8x8 for shapes), upscaled with their captions: PSNR against the true 32x32 image for the
  upscaler and for bicubic interpolation of the same input (PIL), and the shapes analyzer's
  read-back of shape, colour, size and position on both against the true attributes.
* ``text_guidance``: small circles and squares, whose low-resolution image does not tell them
  apart, upscaled with a caption naming their true shape and with one naming the other shape: how
  often the analyzer reads the prompt's shape (and, for contrast, bicubic's read-back).
PNG: true | low-res (nearest) | bicubic | upscaled rows.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from jaxgen.data import shapes
from jaxgen.data.pipeline import box_downsample
from jaxgen.eval.images import make_grid, save_png

EVAL_SEED = 0
EVAL_SPLIT = "test"


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images [N, H, W, C] (inf where equal)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean((1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)


def bicubic(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [N, h, w, 3] -> uint8 [N, H, W, 3] by PIL's bicubic resize."""
    return np.stack([np.asarray(Image.fromarray(x).resize((size[1], size[0]), Image.BICUBIC)) for x in images])


def _read_back(images: np.ndarray, attrs: dict) -> dict[str, float]:
    read = shapes.analyze(images)
    return {a: float((read[a] == attrs[a]).mean()) for a in shapes.ATTRIBUTES}


def evaluate(run, out_dir: str, eval_cfg=None) -> dict[str, Any]:
    num = int(eval_cfg.examples) if eval_cfg is not None else 360
    num_amb = int(eval_cfg.ambiguous) if eval_cfg is not None else 120
    os.makedirs(out_dir, exist_ok=True)
    factor = run.task.ldm.vae_factor
    data = shapes.generate_split(EVAL_SPLIT, num)
    truth = data["image"]
    low = box_downsample(truth, factor)
    up = run.upscale(low, data["caption"], seed=EVAL_SEED)
    cubic = bicubic(low, truth.shape[1:3])
    attrs = {a: data[a] for a in shapes.ATTRIBUTES}
    out: dict[str, Any] = {"examples": num, "factor": factor, "reconstruction": {
        "psnr_upscaler": float(np.mean(np.minimum(psnr(up, truth), 100.0))),
        "psnr_bicubic": float(np.mean(np.minimum(psnr(cubic, truth), 100.0))),
        "read_back_upscaler": _read_back(up, attrs), "read_back_bicubic": _read_back(cubic, attrs)}}
    rec = out["reconstruction"]
    out["target_beats_bicubic_met"] = bool(rec["psnr_upscaler"] > rec["psnr_bicubic"])
    out["target_read_back_0.9_met"] = bool(min(rec["read_back_upscaler"].values()) >= 0.9)
    nearest = np.repeat(np.repeat(low, factor, 1), factor, 2)
    k = min(12, num)
    save_png(os.path.join(out_dir, "upscale.png"),
             make_grid(np.concatenate([truth[:k], nearest[:k], cubic[:k], up[:k]]), ncol=k, upscale=2))

    # text guidance where the low-res input is ambiguous: small circles and squares
    rng = np.random.default_rng(EVAL_SEED)
    rows = []
    for j in range(num_amb):
        s, c, p = j % 2, rng.integers(len(shapes.COLORS)), rng.integers(len(shapes.POSITIONS))
        jit = tuple(int(v) for v in rng.integers(-1, 2, 3))
        rows.append((s, int(c), int(p), jit))
    images = np.stack([shapes.draw_shape(s, c, "small", p, jitter=j) for s, c, p, j in rows])
    low = box_downsample(images, factor)
    true_shape = np.asarray([s for s, _, _, _ in rows])
    out["text_guidance"] = {"examples": num_amb,
                            "bicubic_reads_true_shape": float((shapes.analyze(bicubic(low, images.shape[1:3]))["shape"]
                                                               == true_shape).mean())}
    grids = [images[:k], np.repeat(np.repeat(low[:k], factor, 1), factor, 2)]
    for name, shape_of in (("true_shape_prompt", true_shape), ("other_shape_prompt", 1 - true_shape)):
        prompts = [shapes.caption(int(s), c, "small", p) for s, (_, c, p, _) in zip(shape_of, rows)]
        ups = run.upscale(low, prompts, seed=EVAL_SEED)
        out["text_guidance"][name] = float((shapes.analyze(ups)["shape"] == shape_of).mean())
        grids.append(ups[:k])
    out["target_text_guidance_0.8_met"] = bool(out["text_guidance"]["true_shape_prompt"] >= 0.8)
    save_png(os.path.join(out_dir, "upscale_text_guidance.png"), make_grid(np.concatenate(grids), ncol=k, upscale=2))
    return out
