"""Write an example paired image folder: shapes as (grey source, colour image) pairs.

The layout is the one ``load_dataset("folder:DIR", split, fields=("source", "image"))`` reads
(jaxgen.data.folder): DIR/{train,test}/{source,image}/NNNNN.png with the same file names in both
field folders, and DIR/{train,test}/metadata.jsonl giving each pair its caption. The source is
the image's BT.601 luminance saved as an RGB PNG (grey in all three channels), so a paired
autoencoder run (configs/paired_colorize.py) learns colorization from files, not from a
corruption computed in the training step.

    python -m train.make_paired --out runs/paired_shapes
"""
from __future__ import annotations

import json
import os

import numpy as np

from jaxgen.corruption import LUMA
from jaxgen.data import shapes

DEFAULT_COUNTS = {"train": 1620, "test": 324}


def grey_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 RGB [N, H, W, 3] -> uint8 [N, H, W, 3]: BT.601 luminance in all three channels."""
    y = np.round(images.astype(np.float64) @ np.asarray(LUMA))                     # [N, H, W]
    return np.repeat(np.clip(y, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def write_paired_shapes(out_dir: str, counts: dict[str, int] | None = None, seed: int = 0) -> dict[str, int]:
    """Write the shapes pairs of each split (default DEFAULT_COUNTS) under ``out_dir``.
    Returns {split: number of pairs written}. Existing files with the same names are replaced."""
    from PIL import Image

    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    for split, n in counts.items():
        data = shapes.generate_split(split, n, seed=seed)
        sources = grey_rgb(data["image"])
        root = os.path.join(out_dir, split)
        for field in ("source", "image"):
            os.makedirs(os.path.join(root, field), exist_ok=True)
        with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as meta:
            for j in range(n):
                name = f"{j:05d}.png"
                Image.fromarray(sources[j]).save(os.path.join(root, "source", name))
                Image.fromarray(data["image"][j]).save(os.path.join(root, "image", name))
                meta.write(json.dumps({"file_name": name, "text": data["caption"][j]}) + "\n")
    return counts
