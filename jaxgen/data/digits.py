"""The embedded *digits* dataset: scikit-learn's 1,797 8x8 handwritten digits.

The data ship inside scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded.
Pixel values v in [0, 16] are stored as uint8 ``round(v * 255 / 16)``; images are [8, 8, 1],
labels 0-9, and each example carries the canonical caption ``CAPTION_TEMPLATES[0]``
("a handwritten digit seven"); the other templates are phrasings for caption augmentation.

Split (fixed, no RNG stream involved): within each class, examples are ordered by the SHA-256 of
``"jaxgen-digits/{seed}/{index}"`` (index = position in scikit-learn's array, seed 0) and the first
30 go to ``test``: 300 test examples (30 per class) and 1,497 train examples, both kept in
scikit-learn's order.
"""
from __future__ import annotations

import hashlib

import numpy as np

from jaxgen.errors import DataError

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Fields {word} ("seven") and {digit} ("7"). The first template is the canonical caption.
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}",
    "a handwritten {word}",
    "the digit {digit}",
    "a small grayscale image of the digit {word}",
    "a handwritten number {digit}",
)
SPLITS = ("train", "test")
TEST_PER_CLASS = 30  # 300 test examples; the other 1,497 are train
SPLIT_SEED = 0


def caption(label: int, template: int = 0) -> str:
    """Caption of a digit label 0-9; template 0 is canonical ("a handwritten digit seven")."""
    is_int = isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_))
    if not is_int or not 0 <= label < NUM_CLASSES:
        raise DataError(f"digit label must be an int in 0..9, got {label!r}")
    if not 0 <= template < len(CAPTION_TEMPLATES):
        raise DataError(f"caption template {template} out of range; there are {len(CAPTION_TEMPLATES)}")
    return CAPTION_TEMPLATES[template].format(word=DIGIT_WORDS[int(label)], digit=int(label))


def captions(label: int) -> list[str]:
    """All phrasings for a digit label 0-9, canonical first (len(CAPTION_TEMPLATES) strings)."""
    return [caption(label, t) for t in range(len(CAPTION_TEMPLATES))]


def load_all() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits in scikit-learn's order: (images uint8 [1797, 8, 8, 1] in {0..255},
    labels int32 [1797] in 0..9)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.asarray(bunch.images, np.float64)  # [1797, 8, 8] in [0, 16]
    if pixels.min() < 0 or pixels.max() > 16:
        raise DataError(f"scikit-learn digits out of the expected [0, 16] range: [{pixels.min()}, {pixels.max()}]")
    images = np.round(pixels * 255.0 / 16.0).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    return images, np.asarray(bunch.target, np.int32)


def split_indices(labels: np.ndarray, split: str, seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices (int64, ascending) into ``load_all()``'s arrays for split "train" or "test"."""
    if split not in SPLITS:
        raise DataError(f"digits has splits {SPLITS}, not {split!r}")
    labels = np.asarray(labels)
    is_test = np.zeros(labels.shape[0], bool)
    for k in range(NUM_CLASSES):
        members = np.nonzero(labels == k)[0]
        keys = [hashlib.sha256(f"jaxgen-digits/{seed}/{i}".encode()).digest() for i in members]
        chosen = [members[j] for j in sorted(range(len(members)), key=keys.__getitem__)[:TEST_PER_CLASS]]
        is_test[chosen] = True
    return np.nonzero(is_test if split == "test" else ~is_test)[0]


def generate_split(split: str) -> dict:
    """A split in memory (what the TFDS builder stores): ``{"image": uint8 [N, 8, 8, 1],
    "label": int32 [N], "index": int32 [N] position in scikit-learn's array,
    "caption": list of N canonical captions}``; N = 1,497 (train) or 300 (test)."""
    images, labels = load_all()
    idx = split_indices(labels, split)
    return {
        "image": images[idx],
        "label": labels[idx],
        "index": idx.astype(np.int32),
        "caption": [caption(int(k)) for k in labels[idx]],
    }
