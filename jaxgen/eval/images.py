"""Image grids and PNG files."""
from __future__ import annotations

import os

import numpy as np


def preview_upscale(image_size: int) -> int:
    """How much to enlarge images of ``image_size`` pixels in preview grids and PNGs: 4x below
    16 px (8x8 digits), 2x up to 32 px (shapes), 1x above."""
    return 4 if image_size < 16 else 2 if image_size <= 32 else 1


def make_grid(images: np.ndarray, ncol: int = 8, pad: int = 1, upscale: int = 1,
              pad_value: int = 64) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] grid, row-major.

    upscale: nearest-neighbour enlargement of each image (8x8 digits are tiny).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"make_grid takes uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    ncol = max(1, min(ncol, n))
    rows = -(-n // ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray) -> str:
    """Write uint8 [H, W, C] (C = 1 or 3) or [H, W] as PNG; returns the path."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def prompt_grid_png(path: str, prompts: list[str], images: np.ndarray, per_prompt: int) -> str:
    """A PNG with one row per prompt: the prompt's text, then its ``per_prompt`` images.
    images: uint8 [len(prompts) * per_prompt, H, W, C], prompt-major."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(prompts)
    fig, axes = plt.subplots(rows, per_prompt + 1, figsize=(1.1 * per_prompt + 3.2, 1.1 * rows),
                             gridspec_kw={"width_ratios": [3] + [1] * per_prompt}, squeeze=False)
    for r, prompt in enumerate(prompts):
        axes[r, 0].text(1.0, 0.5, prompt, ha="right", va="center", fontsize=8)
        axes[r, 0].axis("off")
        for c in range(per_prompt):
            axes[r, c + 1].imshow(images[r * per_prompt + c], interpolation="nearest")
            axes[r, c + 1].axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def spread_indices(n: int, k: int = 16) -> np.ndarray:
    """int [min(k, n)] indices spread evenly over range(n): examples for a figure from a split
    that is sorted (e.g. shapes by attribute combination)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))


def class_rows_grid(samples: np.ndarray, labels: np.ndarray | None, num_classes: int,
                    per_class: int = 10, upscale: int = 1) -> np.ndarray:
    """uint8 grid with one row per class: the first ``per_class`` samples labelled k in row k (a
    short row padded with black images); labels None: the first per_class * 8 samples."""
    if labels is None:
        return make_grid(samples[:per_class * 8], ncol=per_class, upscale=upscale)
    rows = []
    for k in range(num_classes):
        mine = samples[labels == k][:per_class]
        if len(mine) < per_class:
            mine = np.concatenate([mine, np.zeros((per_class - len(mine), *samples.shape[1:]), np.uint8)])
        rows.append(mine)
    return make_grid(np.concatenate(rows), ncol=per_class, upscale=upscale)
