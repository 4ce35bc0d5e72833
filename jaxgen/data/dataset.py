"""ArrayDataset: an in-memory dataset of uint8 images with optional labels, captions, attributes."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxgen.errors import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """An in-memory dataset; the input pipeline indexes its arrays.

    images: uint8 [N, H, W, C] in {0..255} (C = 1 grayscale or 3 RGB).
    labels: int32 [N] in [0, num_classes), or None.
    captions: list of N str (the canonical caption of each example), or None.
    attributes: name -> int32 [N] ids (shapes: "shape", "color", "size", "position", whose names
      are ``jaxgen.data.shapes.ATTRIBUTE_NAMES``), or {} when the dataset has none.
    name, split: what ``load_dataset`` was asked for (e.g. "shapes", "heldout").
    num_classes: number of label classes, or None when there are no labels.
    class_names: a name per class (len num_classes), or None.
    Construction checks all of the above and raises DataError naming the mismatch.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    captions: list[str] | None = None
    attributes: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    name: str = ""
    split: str = ""
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        where = f"dataset {self.name!r} split {self.split!r}"
        im = self.images
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 4:
            raise DataError(f"{where}: images must be a uint8 numpy array [N, H, W, C], got "
                            f"{type(im).__name__} {getattr(im, 'dtype', '')} {getattr(im, 'shape', '')}")
        n = im.shape[0]
        if self.labels is not None:
            lab = self.labels
            if not isinstance(lab, np.ndarray) or lab.dtype != np.int32 or lab.shape != (n,):
                raise DataError(f"{where}: labels must be int32 [N={n}], got "
                                f"{getattr(lab, 'dtype', type(lab).__name__)} {getattr(lab, 'shape', '')}")
            if self.num_classes is None:
                raise DataError(f"{where}: labels given without num_classes; pass num_classes")
            if n and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise DataError(f"{where}: labels must be in [0, {self.num_classes}), got "
                                f"[{lab.min()}, {lab.max()}]")
        elif self.num_classes is not None:
            raise DataError(f"{where}: num_classes={self.num_classes} given without labels")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DataError(f"{where}: {len(self.class_names)} class_names for num_classes={self.num_classes}")
        if self.captions is not None:
            if len(self.captions) != n or not all(isinstance(c, str) for c in self.captions):
                raise DataError(f"{where}: captions must be a list of N={n} str, got {len(self.captions)} items")
        for key, value in self.attributes.items():
            if not isinstance(value, np.ndarray) or value.dtype != np.int32 or value.shape != (n,):
                raise DataError(f"{where}: attribute {key!r} must be int32 [N={n}], got "
                                f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(d) for d in self.images.shape[1:])


def describe(ds: ArrayDataset) -> str:
    """One line for logs, e.g. "shapes/train: 6480 images 32x32x3 uint8, labels (180 classes),
    captions (e.g. 'a small red circle on the right'), attributes shape/color/size/position"."""
    h, w, c = ds.image_shape
    parts = [f"{ds.name}/{ds.split}: {len(ds)} images {h}x{w}x{c} uint8"]
    if ds.labels is not None:
        parts.append(f"labels ({ds.num_classes} classes)")
    if ds.captions is not None:
        example = f" (e.g. {ds.captions[0]!r})" if ds.captions else ""
        parts.append(f"captions{example}")
    if ds.attributes:
        parts.append("attributes " + "/".join(ds.attributes))
    return ", ".join(parts)
