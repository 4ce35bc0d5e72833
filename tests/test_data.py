"""load_dataset: embedded TFDS datasets, named TFDS datasets, image folders; ArrayDataset."""
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxgen.data import ArrayDataset, describe, load_dataset
from jaxgen.data import digits as D
from jaxgen.data import shapes as S
from jaxgen.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------
# Fixtures: every dataset is prepared once per module into a tmp data dir.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits(data_dir):
    return {split: load_dataset("digits", split, data_dir=data_dir) for split in ("train", "test")}


@pytest.fixture(scope="module")
def shapes_small(data_dir):
    counts = {"train": 324, "test": 162, "heldout": 36}
    return {split: load_dataset("shapes", split, data_dir=data_dir, num_examples=counts) for split in counts}


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


def test_digits_splits_encoding_and_captions(digits):
    train, test = digits["train"], digits["test"]
    assert (len(train), len(test)) == (1497, 300)
    assert train.image_shape == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int32 and train.num_classes == 10
    assert np.bincount(test.labels, minlength=10).tolist() == [30] * 10
    images, labels = D.load_all()
    from sklearn.datasets import load_digits

    raw = load_digits().images
    assert np.array_equal(images[..., 0], np.round(raw * 255 / 16).astype(np.uint8))
    test_idx, train_idx = D.split_indices(labels, "test"), D.split_indices(labels, "train")
    assert not set(test_idx) & set(train_idx) and len(test_idx) + len(train_idx) == 1797
    assert np.array_equal(test.images, images[test_idx]) and np.array_equal(train.labels, labels[train_idx])
    assert test.captions[0] == D.caption(int(test.labels[0]))
    assert D.caption(7) == "a handwritten digit seven" and D.captions(7)[1] == "the number 7"
    assert describe(train).startswith("digits/train: 1497 images 8x8x1 uint8, labels (10 classes)")


def test_prepared_data_is_reused(digits, data_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("download_and_prepare called on prepared data")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)
    again = load_dataset("digits", "test", data_dir=data_dir)
    assert np.array_equal(again.images, digits["test"].images)
    assert again.captions == digits["test"].captions


def test_decoded_split_is_kept_for_the_process(digits, data_dir, monkeypatch):
    """A split read again in the same process is not decoded again; the caller's arrays are its
    own (writable copies); a split whose stored files change is read afresh."""
    from jaxgen.data import sources

    first = load_dataset("digits", "test", data_dir=data_dir)
    calls = []
    real = tfds.core.DatasetBuilder.as_data_source
    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source",
                        lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    again = load_dataset("digits", "test", data_dir=data_dir)
    assert calls == [] and np.array_equal(again.images, first.images) and again.captions == first.captions
    again.images[0] = 0                                   # the caller's copy, not the kept examples
    assert np.array_equal(load_dataset("digits", "test", data_dir=data_dir).images, first.images)
    ours = [k for k in sources._DECODED if k[1] == "test" and k[0].startswith(os.path.join(data_dir, "jaxgen_digits"))]
    assert len(ours) == 1                                 # this data_dir's digits test split, once
    assert not sources._DECODED[ours[0]][0]["image"].flags.writeable
    folder = ours[0][0]
    info = os.path.join(folder, "dataset_info.json")
    os.utime(info, ns=(os.stat(info).st_atime_ns, os.stat(info).st_mtime_ns + 1_000_000))
    assert np.array_equal(load_dataset("digits", "test", data_dir=data_dir).images, first.images)
    assert len(calls) == 1                                # changed files: decoded again


def test_split_and_option_errors(digits, data_dir):
    with pytest.raises(DataError, match="split 'heldout'.*available splits"):
        load_dataset("digits", "heldout", data_dir=data_dir)
    with pytest.raises(DataError, match="does not take option"):
        load_dataset("digits", "train", data_dir=data_dir, resolution=4)
    sliced = load_dataset("digits", "train[:10]", data_dir=data_dir)
    assert len(sliced) == 10


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------


def test_shapes_splits(shapes_small, data_dir):
    train, test, held = shapes_small["train"], shapes_small["test"], shapes_small["heldout"]
    assert (len(train), len(test), len(held)) == (324, 162, 36)
    assert train.image_shape == (32, 32, 3) and train.num_classes == 180
    assert set(train.labels.tolist()) == set(S.TRAIN_COMBINATIONS) == set(test.labels.tolist())
    assert set(held.labels.tolist()) == set(S.HELDOUT_COMBINATIONS)
    for ds in (train, held):
        a = {k: v for k, v in ds.attributes.items()}
        assert np.array_equal(S.combination_index(a["shape"], a["color"], a["size"], a["position"]), ds.labels)
        assert [S.parse_caption(c)["color"] for c in ds.captions] == a["color"].tolist()
    # stored images are exactly what draw_shape makes with the example's jitter
    expect = S.generate_split("train", 324, seed=0)
    assert np.array_equal(train.images, expect["image"]) and train.captions == expect["caption"]
    assert os.path.isdir(os.path.join(data_dir, "jaxgen_shapes", "seed0-train324-test162-heldout36", "1.0.0"))


def test_shapes_analyzer_reads_dataset(shapes_small):
    for ds in shapes_small.values():
        result = S.adherence(ds.images, ds.attributes)
        assert all(v >= 0.99 for v in result.values()), (ds.split, result)


def test_shapes_seed_and_option_errors(data_dir):
    counts = {"train": 162, "test": 162, "heldout": 18}
    other = load_dataset("shapes", "heldout", data_dir=data_dir, seed=3, num_examples=counts)
    assert len(other) == 18
    base = S.generate_split("heldout", 18, seed=0)
    assert not np.array_equal(other.images, base["image"])
    with pytest.raises(DataError, match="num_examples entries"):
        load_dataset("shapes", "train", data_dir=data_dir, num_examples={"validation": 5})
    with pytest.raises(DataError, match="seed"):
        load_dataset("shapes", "train", data_dir=data_dir, seed=-1)


def test_concurrent_preparation_prepares_once(tmp_path):
    """Two processes preparing into one fresh data dir both succeed (file lock)."""
    code = ("import sys; from jaxgen.data import load_dataset; "
            "print(len(load_dataset('digits', 'test', data_dir=sys.argv[1])))")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "300"
    versions = os.listdir(tmp_path / "jaxgen_digits")
    assert versions == ["1.0.0"], versions  # no leftover incomplete.* directory


# ----------------------------------------------------------------------------------------------
# named TFDS datasets
# ----------------------------------------------------------------------------------------------


class JaxgenTestToyImages(tfds.core.GeneratorBasedBuilder):
    """A tiny TFDS dataset with a real Image feature (PNG bytes, encoded by Pillow, so no
    TensorFlow is needed), a ClassLabel and a Text feature; images 6x6 or 8x8."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["cat", "dog"]),
                "caption": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6, 6), "mixed": self._generate_examples(4, None)}

    def _generate_examples(self, n, size):
        for i in range(n):
            side = size or (6 if i % 2 else 8)
            buf = io.BytesIO()
            Image.fromarray(np.full((side, side, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            buf.seek(0)
            yield i, {"image": buf, "label": i % 2, "caption": f"toy {i}"}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("toy_tfds"))
    JaxgenTestToyImages(data_dir=path, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return path


def test_named_tfds_dataset(toy_dir):
    ds = load_dataset("jaxgen_test_toy_images", "train", data_dir=toy_dir)
    assert ds.images.shape == (6, 6, 6, 3) and ds.images.dtype == np.uint8
    assert sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1, 1] and ds.num_classes == 2
    assert ds.class_names == ("cat", "dog")
    i = ds.captions.index("toy 3")
    assert ds.labels[i] == 1 and ds.images[i, 0, 0, 0] == 120
    with pytest.raises(DataError, match="pass resolution="):
        load_dataset("jaxgen_test_toy_images", "mixed", data_dir=toy_dir)
    mixed = load_dataset("jaxgen_test_toy_images", "mixed", data_dir=toy_dir, resolution=4)
    assert mixed.images.shape == (4, 4, 4, 3)
    with pytest.raises(DataError, match="max_bytes"):
        load_dataset("jaxgen_test_toy_images", "train", data_dir=toy_dir, max_bytes=100)


def test_named_tfds_tfrecord_is_refused(toy_dir, tmp_path):
    """A dataset prepared as TFRecord (TensorFlow's default) needs TensorFlow: refuse, say how to fix."""
    src = os.path.join(toy_dir, "jaxgen_test_toy_images")
    dst = tmp_path / "jaxgen_test_toy_images"
    shutil.copytree(src, dst)
    info = dst / "1.0.0" / "dataset_info.json"
    info.write_text(info.read_text().replace('"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
    with pytest.raises(DataError, match="stored as \\['tfrecord'\\].*--file_format=array_record"):
        load_dataset("jaxgen_test_toy_images", "train", data_dir=str(tmp_path))


def test_named_tfds_absent_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "train", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5.0
    msg = str(info.value)
    assert "not prepared in " + str(tmp_path) in msg and "tfds build mnist --file_format=array_record" in msg
    assert "never downloads" in msg
    with pytest.raises(DataError, match="unknown dataset 'no_such_dataset_xyz'"):
        load_dataset("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written, nothing downloaded


# ----------------------------------------------------------------------------------------------
# image folders
# ----------------------------------------------------------------------------------------------


def _save(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("images"))
    rgb = np.zeros((12, 12, 3), np.uint8)
    rgb[..., 0] = 200
    _save(f"{root}/a.png", rgb)
    _save(f"{root}/b.jpg", rgb, quality=95)
    _save(f"{root}/sub/c.webp", rgb, lossless=True)
    _save(f"{root}/sub/d.PNG", np.full((12, 12), 77, np.uint8))  # grayscale
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:6, :, 3] = 255  # top half opaque blue, bottom half transparent
    _save(f"{root}/e.png", rgba)
    with open(f"{root}/.hidden.png", "wb") as fh:
        fh.write(b"not an image, and ignored")
    with open(f"{root}/notes.txt", "w") as fh:
        fh.write("ignored")
    with open(f"{root}/metadata.jsonl", "w") as fh:
        for name in ("a.png", "b.jpg", "e.png"):
            fh.write(json.dumps({"file_name": name, "text": f"caption of {name}"}) + "\n")
    with open(f"{root}/sub/metadata.jsonl", "w") as fh:
        for name in ("c.webp", "d.PNG"):
            fh.write(json.dumps({"file_name": name, "text": f"caption of {name}"}) + "\n")
    return root


def test_folder_loads_images_and_captions(folder):
    ds = load_dataset(f"folder:{folder}", "train")
    assert ds.images.shape == (5, 12, 12, 3) and ds.images.dtype == np.uint8
    assert ds.captions == [f"caption of {n}" for n in ("a.png", "b.jpg", "e.png", "c.webp", "d.PNG")]
    assert ds.labels is None and ds.name == f"folder:{folder}"
    assert tuple(ds.images[0, 0, 0]) == (200, 0, 0) and abs(int(ds.images[1, 5, 5, 0]) - 200) <= 3
    assert tuple(ds.images[2, 0, 0]) == (0, 0, 255) and tuple(ds.images[2, 11, 0]) == (255, 255, 255)
    assert tuple(ds.images[4, 3, 3]) == (77, 77, 77)
    resized = load_dataset(f"folder:{folder}", "train", resolution=(4, 8))
    assert resized.images.shape == (5, 4, 8, 3)
    with pytest.raises(DataError, match="no 'test' subfolder"):
        load_dataset(f"folder:{folder}", "test")


def test_folder_errors(tmp_path):
    good = np.zeros((8, 8, 3), np.uint8)
    _save(f"{tmp_path}/size/a.png", good)
    _save(f"{tmp_path}/size/b.png", np.zeros((8, 10, 3), np.uint8))
    with pytest.raises(DataError, match=r"b\.png is 10x8 .*a\.png is 8x8.*resolution="):
        load_dataset(f"folder:{tmp_path}/size", "train")
    assert load_dataset(f"folder:{tmp_path}/size", "train", resolution=8).images.shape == (2, 8, 8, 3)

    _save(f"{tmp_path}/corrupt/a.png", good)
    with open(f"{tmp_path}/corrupt/broken.png", "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_dataset(f"folder:{tmp_path}/corrupt", "train")

    _save(f"{tmp_path}/trunc/a.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = open(f"{tmp_path}/trunc/a.png", "rb").read()
    with open(f"{tmp_path}/trunc/a.png", "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*trunc/a\.png"):
        load_dataset(f"folder:{tmp_path}/trunc", "train")

    _save(f"{tmp_path}/meta/a.png", good)
    _save(f"{tmp_path}/meta/b.png", good)
    with open(f"{tmp_path}/meta/metadata.jsonl", "w") as fh:
        fh.write(json.dumps({"file_name": "a.png", "text": "only a"}) + "\n")
    with pytest.raises(DataError, match=r"have no line in metadata\.jsonl.*b\.png"):
        load_dataset(f"folder:{tmp_path}/meta", "train")

    _save(f"{tmp_path}/splits/train/a.png", good)
    _save(f"{tmp_path}/splits/test/b.png", good)
    assert len(load_dataset(f"folder:{tmp_path}/splits", "test")) == 1
    os.rename(f"{tmp_path}/splits/train", f"{tmp_path}/splits/other")
    with pytest.raises(DataError, match="no 'train' subfolder"):
        load_dataset(f"folder:{tmp_path}/splits", "train")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"folder:{tmp_path}/missing", "train")
    os.makedirs(f"{tmp_path}/empty")
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"folder:{tmp_path}/empty", "train")


# ----------------------------------------------------------------------------------------------
# ArrayDataset
# ----------------------------------------------------------------------------------------------


def test_array_dataset_validates():
    images = np.zeros((3, 4, 4, 1), np.uint8)
    ds = ArrayDataset(images, labels=np.array([0, 1, 1], np.int32), num_classes=2, name="x", split="train")
    assert len(ds) == 3 and ds.image_shape == (4, 4, 1)
    assert describe(ds) == "x/train: 3 images 4x4x1 uint8, labels (2 classes)"
    with pytest.raises(DataError, match="uint8"):
        ArrayDataset(images.astype(np.float32))
    with pytest.raises(DataError, match="labels must be in"):
        ArrayDataset(images, labels=np.array([0, 1, 2], np.int32), num_classes=2)
    with pytest.raises(DataError, match="captions"):
        ArrayDataset(images, captions=["a", "b"])
    with pytest.raises(DataError, match="attribute 'color'"):
        ArrayDataset(images, attributes={"color": np.zeros(3, np.int64)})
    with pytest.raises(AttributeError):
        ds.name = "y"  # frozen
