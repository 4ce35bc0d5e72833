"""TFDS builders of the embedded datasets (registered as ``jaxgen_digits``, ``jaxgen_shapes`` and
``jaxgen_photos``).

They prepare offline and without TensorFlow: every feature is a ``Tensor``, ``ClassLabel`` or
``Text`` (no ``Image`` feature, whose PNG encoding needs TensorFlow) and the files are ArrayRecord,
read back with ``builder.as_data_source()``. Importing this module imports tensorflow_datasets;
``jaxgen.data.sources`` imports it only when an embedded dataset is loaded.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from jaxgen.data import digits, photos, shapes


class JaxgenDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits; see ``jaxgen.data.digits`` for the encoding and the split.

    Features: image uint8 [8, 8, 1], label ClassLabel(10), caption Text (bytes when read),
    index int32 (position in scikit-learn's array). Splits: train 1,497, test 300.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's 1,797 8x8 handwritten digits, pixels round(v * 255 / 16).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=digits.IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(digits.DIGIT_WORDS)),
                "caption": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in digits.SPLITS}

    def _generate_examples(self, split):
        data = digits.generate_split(split)
        for j in range(len(data["label"])):
            yield j, {
                "image": data["image"][j],
                "label": int(data["label"][j]),
                "caption": data["caption"][j],
                "index": int(data["index"][j]),
            }


def shapes_config_name(seed: int, num_examples: dict) -> str:
    """Config (and directory) name, e.g. "seed0-train6480-test1620-heldout180"."""
    return f"seed{seed}-" + "-".join(f"{s}{num_examples[s]}" for s in shapes.SPLITS)


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Which shapes data to generate: the seed of the jitter and the size of each split."""

    seed: int = 0
    num_train: int = shapes.DEFAULT_NUM_EXAMPLES["train"]
    num_test: int = shapes.DEFAULT_NUM_EXAMPLES["test"]
    num_heldout: int = shapes.DEFAULT_NUM_EXAMPLES["heldout"]

    @classmethod
    def make(cls, seed: int = 0, num_examples: dict | None = None) -> ShapesConfig:
        """A config named after its parameters; num_examples: split -> count (missing = default)."""
        counts = dict(shapes.DEFAULT_NUM_EXAMPLES, **(num_examples or {}))
        return cls(
            name=shapes_config_name(seed, counts),
            description=f"shapes with jitter seed {seed} and split sizes {counts}",
            seed=seed, num_train=counts["train"], num_test=counts["test"], num_heldout=counts["heldout"],
        )


class JaxgenShapes(tfds.core.GeneratorBasedBuilder):
    """Generated 32x32 shapes; see ``jaxgen.data.shapes`` for the geometry and the held-out set.

    Features: image uint8 [32, 32, 3]; label ClassLabel(180) = combination index; shape, color,
    size, position ClassLabels; jitter int32 [3] (dsize, dx, dy); caption Text (canonical);
    index int32 (example number j in its split).
    Splits: train and test over the 162 training combinations, heldout over the 18 held-out ones.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [ShapesConfig.make()]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Generated single-shape scenes with exact colours and geometry (DESIGN.md section 4).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=shapes.NUM_COMBINATIONS),
                **{a: tfds.features.ClassLabel(names=list(shapes.ATTRIBUTE_NAMES[a])) for a in shapes.ATTRIBUTES},
                "jitter": tfds.features.Tensor(shape=(3,), dtype=np.int32),
                "caption": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        counts = {"train": cfg.num_train, "test": cfg.num_test, "heldout": cfg.num_heldout}
        return {split: self._generate_examples(split, counts[split], cfg.seed) for split in shapes.SPLITS}

    def _generate_examples(self, split, num_examples, seed):
        data = shapes.generate_split(split, num_examples, seed)
        for j in range(num_examples):
            example = {a: int(data[a][j]) for a in ("label",) + shapes.ATTRIBUTES}
            yield j, {**example, "image": data["image"][j], "jitter": data["jitter"][j],
                      "caption": data["caption"][j], "index": j}


class JaxgenPhotos(tfds.core.GeneratorBasedBuilder):
    """32x32 patches of scikit-learn's two sample photographs; see ``jaxgen.data.photos``.

    Features: image uint8 [32, 32, 3], label ClassLabel(china, flower), top and left int32 (the
    patch's position in its photo), index int32. Splits: train 4,096 and test 512 patches, cut
    from disjoint column ranges of the photos.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Random 32x32 patches of scikit-learn's china.jpg and flower.jpg, train and test "
                        "cut from disjoint regions.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=photos.IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(photos.PHOTOS)),
                "top": tfds.features.Scalar(dtype=np.int32),
                "left": tfds.features.Scalar(dtype=np.int32),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in photos.SPLITS}

    def _generate_examples(self, split):
        data = photos.generate_split(split)
        for j in range(len(data["label"])):
            yield j, {k: data[k][j] if k == "image" else int(data[k][j])
                      for k in ("image", "label", "top", "left", "index")}
