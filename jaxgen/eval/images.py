"""Image grids and PNG files."""
from __future__ import annotations

import os

import numpy as np


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
