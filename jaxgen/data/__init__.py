"""Datasets: embedded TFDS datasets (digits, shapes, photos), named TFDS datasets and image folders
(single images, paired / n-tuple fields, clips); examples are named fields of any rank.

``load_dataset(name, split, data_dir=None, **options) -> ArrayDataset`` is the entry point
(``jaxgen.data.sources``); ``describe(ds)`` gives a log line. Importing this package is light:
tensorflow_datasets, scikit-learn, scipy and Pillow load only when a function needs them.
"""
from jaxgen.data.dataset import ArrayDataset, describe
from jaxgen.data.sources import default_data_dir, load_dataset, prepare_embedded, tfds_data_dir

__all__ = ["ArrayDataset", "describe", "load_dataset", "default_data_dir", "tfds_data_dir", "prepare_embedded"]
