"""ArrayDataset: an in-memory dataset of named per-example fields of any rank.

Every example is a set of named values; a dataset holds each field as one array (or, for text,
one list) whose first axis is the example. The common fields have their own attributes:

    "image"    images      uint8 [N, H, W, C]
    "label"    labels      int32 [N] (with num_classes, class_names)
    "caption"  captions    list of N str
    attribute  attributes  int32 [N] each (shapes: "shape", "color", "size", "position")

and any other field goes into ``arrays`` (e.g. "source" / "control" / "low_res" uint8
[N, H, W, C], "frames" uint8 [N, F, H, W, C], "noise_level" int32 [N]) or ``texts`` (e.g.
"instruction": list of N str). ``ds.field(name)`` reads any of them by name; a task declares the
fields it needs (``jaxgen.data.fields.Input``) and gets a DataError naming a missing or
mis-shaped one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxgen.errors import DataError

IMAGE, LABEL, CAPTION = "image", "label", "caption"


def _shape_of(value) -> str:
    return f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}".strip()


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """An in-memory dataset; the input pipeline indexes its arrays by example.

    images: uint8 [N, H, W, C] in {0..255} (C = 1 grayscale or 3 RGB), or None for datasets
      without a single-image field (e.g. clips only).
    labels: int32 [N] in [0, num_classes), or None.
    captions: list of N str (the canonical caption of each example), or None.
    attributes: name -> int32 [N] ids (shapes: "shape", "color", "size", "position", whose names
      are ``jaxgen.data.shapes.ATTRIBUTE_NAMES``), or {} when the dataset has none.
    arrays: further fields, name -> numpy array [N, ...] of any rank and dtype (uint8 image-like
      fields: [N, H, W, C] or [N, F, H, W, C] for clips).
    texts: further text fields, name -> list of N str.
    name, split: what ``load_dataset`` was asked for (e.g. "shapes", "heldout").
    num_classes: number of label classes, or None when there are no labels.
    class_names: a name per class (len num_classes), or None.
    Construction checks all of the above (every field has the same N, names are unique) and raises
    DataError naming the mismatch.
    """

    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    captions: list[str] | None = None
    attributes: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    name: str = ""
    split: str = ""
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    arrays: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    texts: Mapping[str, list[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        where = f"dataset {self.name!r} split {self.split!r}"
        im = self.images
        if im is not None and (not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 4):
            raise DataError(f"{where}: images must be a uint8 numpy array [N, H, W, C], got "
                            f"{type(im).__name__} {_shape_of(im)}")
        n = len(self)
        if self.labels is not None:
            lab = self.labels
            if not isinstance(lab, np.ndarray) or lab.dtype != np.int32 or lab.shape != (n,):
                raise DataError(f"{where}: labels must be int32 [N={n}], got {_shape_of(lab)}")
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
                raise DataError(f"{where}: attribute {key!r} must be int32 [N={n}], got {_shape_of(value)}")
        for key, value in self.arrays.items():
            if not isinstance(value, np.ndarray) or value.ndim < 1 or value.shape[0] != n:
                raise DataError(f"{where}: field {key!r} must be a numpy array [N={n}, ...], got "
                                f"{_shape_of(value)}")
        for key, value in self.texts.items():
            if not isinstance(value, (list, tuple)) or len(value) != n or not all(isinstance(t, str) for t in value):
                raise DataError(f"{where}: text field {key!r} must be a list of N={n} str")
        names = self._named()
        seen: set[str] = set()
        for group in names.values():
            dup = seen & set(group)
            if dup:
                raise DataError(f"{where}: field name(s) {sorted(dup)} are used twice; give every field "
                                "its own name")
            seen |= set(group)

    def _named(self) -> dict[str, tuple[str, ...]]:
        """Field names by where they live."""
        return {"common": tuple(n for n, v in ((IMAGE, self.images), (LABEL, self.labels),
                                                (CAPTION, self.captions)) if v is not None),
                "attributes": tuple(self.attributes), "arrays": tuple(self.arrays),
                "texts": tuple(self.texts)}

    def __len__(self) -> int:
        for value in (self.images, self.labels, self.captions, *self.arrays.values(),
                      *self.texts.values(), *self.attributes.values()):
            if value is not None:
                return len(value)
        return 0

    @property
    def field_names(self) -> tuple[str, ...]:
        """Every field this dataset has, e.g. ("image", "label", "caption", "shape", ..., "source")."""
        return tuple(n for group in self._named().values() for n in group)

    def has(self, name: str) -> bool:
        return name in self.field_names

    def field(self, name: str):
        """The field ``name`` for all examples: a numpy array [N, ...] or a list of N str.
        Raises DataError naming the fields the dataset has."""
        common = {IMAGE: self.images, LABEL: self.labels, CAPTION: self.captions}
        if name in common and common[name] is not None:
            return common[name]
        for table in (self.attributes, self.arrays, self.texts):
            if name in table:
                return table[name]
        raise DataError(f"dataset {self.name!r} split {self.split!r} has no field {name!r}; it has "
                        f"{', '.join(self.field_names) or 'no fields'}.")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        if self.images is None:
            raise DataError(f"dataset {self.name!r} split {self.split!r} has no 'image' field; it has "
                            f"{', '.join(self.field_names)}.")
        return tuple(int(d) for d in self.images.shape[1:])


def describe(ds: ArrayDataset) -> str:
    """One line for logs, e.g. "shapes/train: 6480 images 32x32x3 uint8, labels (180 classes),
    captions (e.g. 'a small red circle on the right'), attributes shape/color/size/position"; the
    further fields follow ("source 32x32x3 uint8", "text instruction")."""
    if ds.images is not None:
        h, w, c = ds.image_shape
        parts = [f"{ds.name}/{ds.split}: {len(ds)} images {h}x{w}x{c} uint8"]
    else:
        parts = [f"{ds.name}/{ds.split}: {len(ds)} examples"]
    if ds.labels is not None:
        parts.append(f"labels ({ds.num_classes} classes)")
    if ds.captions is not None:
        example = f" (e.g. {ds.captions[0]!r})" if ds.captions else ""
        parts.append(f"captions{example}")
    if ds.attributes:
        parts.append("attributes " + "/".join(ds.attributes))
    for key, value in ds.arrays.items():
        parts.append(f"{key} {'x'.join(map(str, value.shape[1:])) or 'scalar'} {value.dtype}")
    for key in ds.texts:
        parts.append(f"text {key}")
    return ", ".join(parts)
