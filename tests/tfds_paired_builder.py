"""A tiny TFDS builder with named image-like fields, for tests/test_data_fields.py.

TFDS needs a custom builder in a module file (DESIGN.md section 9). Every feature is a Tensor,
ClassLabel or Text, so it prepares without TensorFlow (as jaxgen.data.builders). Registered as
``jaxgen_test_paired``.
"""
import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 5


def example(j: int) -> dict:
    """Example j: constant images whose values encode j, so tests can check the order."""
    return {
        "image": np.full((8, 8, 3), 10 * j, np.uint8),
        "source": np.full((8, 8, 1), 10 * j + 1, np.uint8),
        "low_res": np.full((4, 4, 3), 10 * j + 2, np.uint8),
        "frames": (np.arange(4, dtype=np.uint8)[:, None, None, None] + 10 * j + np.zeros((4, 8, 8, 3), np.uint8)),
        "label": j % 2,
        "caption": f"caption {j}",
        "edit_prompt": f"make it {j}",
        "index": j,
    }


class JaxgenTestPaired(tfds.core.GeneratorBasedBuilder):
    """image [8, 8, 3], source [8, 8, 1], low_res [4, 4, 3], frames [4, 8, 8, 3] (uint8 Tensors),
    label ClassLabel(2), caption and edit_prompt Text, index int32. Split train: 5 examples."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
                "source": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "low_res": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
                "frames": tfds.features.Tensor(shape=(4, 8, 8, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["even", "odd"]),
                "caption": tfds.features.Text(),
                "edit_prompt": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(NUM_TRAIN)}

    def _generate_examples(self, n):
        for j in range(n):
            yield j, example(j)


def prepare(data_dir: str) -> None:
    JaxgenTestPaired(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
