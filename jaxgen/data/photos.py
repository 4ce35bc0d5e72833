"""The embedded *photos* dataset: 32x32 patches of scikit-learn's two bundled sample photographs.

``sklearn.datasets.load_sample_images()`` ships china.jpg and flower.jpg (427 x 640 RGB) inside
scikit-learn, so nothing is downloaded. Patches are cut at positions drawn by
``numpy.random.default_rng([SEED, photo, split])`` (PCG64: the same positions on every machine),
uniformly inside a region of the photo that belongs to the split:

    train: columns [0, 448)   -> patch left edges 0 .. 416
    test:  columns [480, 640) -> patch left edges 480 .. 608

so no test pixel ever occurs in a training patch (and a 32-column gap separates the regions).
Each split takes half of its patches from each photo. Labels: which photo (0 china, 1 flower);
attributes "top" and "left": the patch's position in its photo.
"""
from __future__ import annotations

import numpy as np

from jaxgen.errors import DataError

PHOTOS = ("china", "flower")            # label names; the files are PHOTOS[i] + ".jpg"
PATCH = 32
IMAGE_SHAPE = (PATCH, PATCH, 3)
SPLITS = ("train", "test")
COLUMNS = {"train": (0, 448), "test": (480, 640)}   # [start, end) columns of each split's region
NUM_EXAMPLES = {"train": 4096, "test": 512}
SEED = 0
PHOTO_SHAPE = (427, 640, 3)   # both photographs


def load_photos() -> np.ndarray:
    """Both photographs: uint8 [2, 427, 640, 3], in PHOTOS order."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    by_name = {name.replace("\\", "/").rsplit("/", 1)[-1]: image
               for name, image in zip(bunch.filenames, bunch.images)}
    missing = [p + ".jpg" for p in PHOTOS if p + ".jpg" not in by_name]
    if missing:
        raise DataError(f"scikit-learn's sample images lack {missing} (found {sorted(by_name)}); "
                        "reinstall scikit-learn.")
    return np.stack([np.asarray(by_name[p + ".jpg"], np.uint8) for p in PHOTOS])


def patch_positions(split: str, num_examples: int | None = None) -> dict:
    """Where the patches of ``split`` are cut: {"label": int32 [N] photo id, "top", "left": int32 [N]}.

    N = num_examples (default NUM_EXAMPLES[split]), the first ceil(N/2) from photo 0.
    """
    if split not in SPLITS:
        raise DataError(f"photos has splits {SPLITS}, not {split!r}")
    n = NUM_EXAMPLES[split] if num_examples is None else int(num_examples)
    lo, hi = COLUMNS[split]
    height = PHOTO_SHAPE[0]
    labels, tops, lefts = [], [], []
    for photo, count in enumerate((n - n // 2, n // 2)):
        rng = np.random.default_rng([SEED, photo, SPLITS.index(split)])
        tops.append(rng.integers(0, height - PATCH + 1, count))
        lefts.append(rng.integers(lo, hi - PATCH + 1, count))
        labels.append(np.full(count, photo))
    return {"label": np.concatenate(labels).astype(np.int32), "top": np.concatenate(tops).astype(np.int32),
            "left": np.concatenate(lefts).astype(np.int32)}


def generate_split(split: str, num_examples: int | None = None) -> dict:
    """A split in memory (what the TFDS builder stores): patch_positions' arrays plus
    "image": uint8 [N, 32, 32, 3] and "index": int32 [N]."""
    photos = load_photos()
    if photos.shape[1:] != PHOTO_SHAPE:
        raise DataError(f"scikit-learn's sample photos are {photos.shape[1:]}, not {PHOTO_SHAPE}: this "
                        "scikit-learn ships other sample images; the photos dataset cannot be cut from them.")
    pos = patch_positions(split, num_examples)
    images = np.stack([photos[k, t:t + PATCH, x:x + PATCH]
                       for k, t, x in zip(pos["label"], pos["top"], pos["left"])])
    return {**pos, "image": images, "index": np.arange(len(images), dtype=np.int32)}
