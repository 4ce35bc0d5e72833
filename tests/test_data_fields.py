"""Datasets with named fields of any rank: paired image folders, clip folders, TFDS features."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from jaxgen.data import describe, load_dataset
from jaxgen.data.fields import Input, gather
from jaxgen.data.folder import resize_center_crop
from jaxgen.errors import DataError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the builder module lives beside this file
import tfds_paired_builder as paired_builder  # noqa: E402


def _save(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _metadata(path, rows):
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _luma(rgb):
    return np.asarray(Image.fromarray(rgb).convert("L"))[..., None]


def _rgb(seed, h=16, w=16):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# paired folders
# ----------------------------------------------------------------------------------------------

KEYS = ("a", "b", "sub/c")


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """train/{source,image}/ with 3 pairs (extensions differ), metadata with text + edit_prompt;
    test/ with one pair and no metadata."""
    root = str(tmp_path_factory.mktemp("paired"))
    for i, key in enumerate(KEYS):
        _save(f"{root}/train/source/{key}.{'jpg' if key == 'a' else 'png'}", _rgb(10 + i),
              **({"quality": 100} if key == "a" else {}))
        _save(f"{root}/train/image/{key}.{'webp' if key == 'b' else 'png'}", _rgb(20 + i),
              **({"lossless": True} if key == "b" else {}))
    _metadata(f"{root}/train/metadata.jsonl", [
        {"file_name": "sub/c.png", "text": "caption c", "edit_prompt": "edit c", "other": 1},
        {"file_name": "a.png", "text": "caption a", "edit_prompt": "edit a", "other": 2},
        {"file_name": "b", "text": "caption b", "edit_prompt": "edit b", "other": 3},
    ])
    _save(f"{root}/test/source/z.png", _rgb(30))
    _save(f"{root}/test/image/z.png", _rgb(31))
    return root


def test_paired_folder_fields_and_texts(paired):
    ds = load_dataset(f"folder:{paired}", "train", fields=("source", "image"), grayscale=("source",),
                      text_columns=("edit_prompt",))
    assert ds.images.shape == (3, 16, 16, 3) and ds.images.dtype == np.uint8
    assert set(ds.arrays) == {"source"} and ds.arrays["source"].shape == (3, 16, 16, 1)
    assert ds.captions == ["caption a", "caption b", "caption c"]
    assert ds.texts == {"edit_prompt": ["edit a", "edit b", "edit c"]}
    assert np.array_equal(ds.images[0], _rgb(20)) and np.array_equal(ds.images[1], _rgb(21))  # png, lossless webp
    assert np.array_equal(ds.arrays["source"][2], _luma(_rgb(12)))  # grey: Pillow's convert("L")
    assert np.abs(ds.arrays["source"][0].astype(int) - _luma(_rgb(10))).mean() < 8  # from a jpg
    assert set(ds.field_names) == {"image", "caption", "source", "edit_prompt"}
    assert "source 16x16x1 uint8" in describe(ds) and "text edit_prompt" in describe(ds)
    rgb = load_dataset(f"folder:{paired}", "train", fields=("image", "source"), caption_column=None)
    assert rgb.arrays["source"].shape == (3, 16, 16, 3) and rgb.captions is None and rgb.texts == {}
    test = load_dataset(f"folder:{paired}", "test", fields=("source", "image"))
    assert len(test) == 1 and test.captions is None and np.array_equal(test.images[0], _rgb(31))
    only_source = load_dataset(f"folder:{paired}", "train", fields=("source",), grayscale="source")
    assert only_source.images is None and only_source.field("source").shape == (3, 16, 16, 1)


def test_paired_folder_errors(paired, tmp_path):
    root = str(tmp_path / "p")
    shutil.copytree(paired, root)
    name = f"folder:{root}"
    os.remove(f"{root}/train/image/b.webp")
    with pytest.raises(DataError, match=r"source/b\.png has no counterpart in .*train/image/ \(field 'image'"):
        load_dataset(name, "train", fields=("source", "image"))
    _save(f"{root}/train/image/b.png", _rgb(21))
    _save(f"{root}/train/image/d.png", _rgb(22))  # extra file in one field folder
    with pytest.raises(DataError, match=r"image/d\.png has no counterpart in .*train/source/"):
        load_dataset(name, "train", fields=("source", "image"))
    os.remove(f"{root}/train/image/d.png")
    _save(f"{root}/train/image/b.jpg", _rgb(21))
    with pytest.raises(DataError, match=r"image/b\.(png|jpg) and .*image/b\.(png|jpg) are the same example"):
        load_dataset(name, "train", fields=("source", "image"))
    os.remove(f"{root}/train/image/b.jpg")
    with pytest.raises(DataError, match=r"no control/ subfolder for field 'control' \(it has \['image', 'source'\]"):
        load_dataset(name, "train", fields=("control", "image"))
    with pytest.raises(DataError, match="grayscale names \\['control'\\]"):
        load_dataset(name, "train", fields=("source", "image"), grayscale=("control",))
    with pytest.raises(DataError, match="edit_prompt.*missing"):
        load_dataset(name, "train", fields=("source", "image"), text_columns=("edit_prompt", "missing"))
    _metadata(f"{root}/train/metadata.jsonl", [{"file_name": "image/a.png", "text": "x"}])
    with pytest.raises(DataError, match=r"names 'image/a\.png'.*write 'a'.*without 'image/'"):
        load_dataset(name, "train", fields=("source", "image"))
    _metadata(f"{root}/train/metadata.jsonl", [{"file_name": "a.png", "text": "x"}])
    with pytest.raises(DataError, match=r"2 example\(s\) have no line in .*metadata\.jsonl, e\.g\. \['b', 'sub/c'\]"):
        load_dataset(name, "train", fields=("source", "image"))
    with pytest.raises(DataError, match="text_columns=\\('edit_prompt',\\) but there is no metadata.jsonl"):
        load_dataset(name, "test", fields=("source", "image"), text_columns=("edit_prompt",))
    with pytest.raises(DataError, match="does not take option\\(s\\) \\['field'\\]"):
        load_dataset(name, "train", field=("source", "image"))


def test_per_field_resolution(tmp_path):
    for i in range(2):
        _save(f"{tmp_path}/low_res/{i}.png", _rgb(i, 8, 8))
        _save(f"{tmp_path}/image/{i}.png", _rgb(i, 32, 32))
    name = f"folder:{tmp_path}"
    ds = load_dataset(name, "train", fields=("low_res", "image"))
    assert ds.images.shape == (2, 32, 32, 3) and ds.arrays["low_res"].shape == (2, 8, 8, 3)
    ds = load_dataset(name, "train", fields=("low_res", "image"), resolution={"image": 16, "low_res": (4, 6)})
    assert ds.images.shape == (2, 16, 16, 3) and ds.arrays["low_res"].shape == (2, 4, 6, 3)
    ds = load_dataset(name, "train", fields=("low_res", "image"), resolution={"image": 16})
    assert ds.images.shape == (2, 16, 16, 3) and np.array_equal(ds.arrays["low_res"][1], _rgb(1, 8, 8))
    ds = load_dataset(name, "train", fields=("low_res", "image"), resolution=4)
    assert ds.images.shape == ds.arrays["low_res"].shape == (2, 4, 4, 3)
    with pytest.raises(DataError, match=r"resolution names field\(s\) \['hr'\].*\['low_res', 'image'\]"):
        load_dataset(name, "train", fields=("low_res", "image"), resolution={"hr": 4})
    _save(f"{tmp_path}/low_res/1.png", _rgb(1, 9, 8))
    with pytest.raises(DataError, match=r"low_res/1\.png is 8x9.*field 'low_res'.*resolution=\{'low_res': size\}"):
        load_dataset(name, "train", fields=("low_res", "image"))
    # a single-image folder takes the dict form and grayscale for its one field, "image"
    single = load_dataset(f"folder:{tmp_path}/image", "train", resolution={"image": 8}, grayscale=("image",))
    assert single.images.shape == (2, 8, 8, 1)


# ----------------------------------------------------------------------------------------------
# clips
# ----------------------------------------------------------------------------------------------


def _frames(seed, f=3, h=8, w=8, c=3):
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, c), dtype=np.uint8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """train/: a frame folder (frames named 1, 2, 10), a .npy, two .npz (key "frames" and an
    unnamed array), metadata with captions and an extra text column."""
    root = str(tmp_path_factory.mktemp("clips"))
    for name, frame in zip(("1.png", "2.png", "10.png"), _frames(0)):
        _save(f"{root}/train/c_folder/{name}", frame)
    np.save(f"{root}/train/a.npy", _frames(1))
    np.savez(f"{root}/train/b.npz", frames=_frames(2), other=np.zeros(3))
    np.savez(f"{root}/train/d.npz", _frames(3))
    _metadata(f"{root}/train/metadata.jsonl", [
        {"file_name": "a.npy", "text": "clip a", "motion": "still"},
        {"file_name": "b", "text": "clip b", "motion": "pan"},
        {"file_name": "c_folder/", "text": "clip c", "motion": "zoom"},
        {"file_name": "d.npz", "text": "clip d", "motion": "tilt"},
    ])
    return root


def test_clips_from_folders_and_arrays(clips):
    ds = load_dataset(f"folder:{clips}", "train", clips=True, text_columns=("motion",))
    frames = ds.arrays["frames"]
    assert frames.shape == (4, 3, 8, 8, 3) and frames.dtype == np.uint8 and ds.images is None
    for i, seed in enumerate((1, 2, 0, 3)):  # a.npy, b.npz, c_folder (1, 2, 10 in order), d.npz
        assert np.array_equal(frames[i], _frames(seed)), i
    assert ds.captions == ["clip a", "clip b", "clip c", "clip d"]
    assert ds.texts["motion"] == ["still", "pan", "zoom", "tilt"]
    assert "frames 3x8x8x3 uint8" in describe(ds)
    two = load_dataset(f"folder:{clips}", "train", clips=True, num_frames=2, resolution=4, grayscale=("frames",))
    assert two.arrays["frames"].shape == (4, 2, 4, 4, 1)
    assert np.array_equal(two.arrays["frames"][0, 1], resize_center_crop(_luma(_frames(1)[1]), 4))  # luma, then resize
    got = gather(ds, {"frames": Input("image", (None, 8, 8, 3)), "caption": Input("text")})
    assert got["frames"].shape == (4, 3, 8, 8, 3) and got["caption"][3] == "clip d"


def test_clip_errors(clips, tmp_path):
    root = str(tmp_path / "c")
    shutil.copytree(f"{clips}/train", root)
    name = f"folder:{root}"
    np.save(f"{root}/e.npy", _frames(4, f=5))
    with pytest.raises(DataError, match=r"clip .*e\.npy is \[F, H, W, C\] = \[5, 8, 8, 3\].*num_frames=K"):
        load_dataset(name, "train", clips=True, caption_column=None)
    cut = load_dataset(name, "train", clips=True, num_frames=3, caption_column=None)
    assert cut.arrays["frames"].shape[:2] == (5, 3)
    with pytest.raises(DataError, match=r"clip .*a\.npy has 3 frames, fewer than num_frames=4"):
        load_dataset(name, "train", clips=True, num_frames=4, caption_column=None)
    with pytest.raises(DataError, match=r"clip\(s\) have no line in .*metadata\.jsonl, e\.g\. \['e\.npy'\]"):
        load_dataset(name, "train", clips=True, num_frames=3)
    os.remove(f"{root}/e.npy")

    np.save(f"{root}/e.npy", _frames(4)[..., 0])  # grey [F, H, W] among RGB clips
    with pytest.raises(DataError, match=r"e\.npy is \[F, H, W, C\] = \[3, 8, 8, 1\].*channel count uniform.*grayscale"):
        load_dataset(name, "train", clips=True, caption_column=None)
    grey = load_dataset(name, "train", clips=True, caption_column=None, grayscale="frames")
    assert grey.arrays["frames"].shape == (5, 3, 8, 8, 1)
    assert np.array_equal(grey.arrays["frames"][4], _frames(4)[..., :1])

    np.save(f"{root}/e.npy", _frames(4).astype(np.float32))
    with pytest.raises(DataError, match=r"e\.npy is float32 \[3, 8, 8, 3\]; each clip is .*uint8 \[F, H, W, C\]"):
        load_dataset(name, "train", clips=True, caption_column=None)
    np.save(f"{root}/e.npy", _frames(4)[0])  # one [H, W, C] image: rank 3 is read as grey frames
    with pytest.raises(DataError, match=r"e\.npy is \[F, H, W, C\] = \[8, 8, 3, 1\]"):
        load_dataset(name, "train", clips=True, caption_column=None)
    with open(f"{root}/e.npy", "wb") as fh:
        fh.write(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"cannot read clip .*e\.npy: .*each clip is"):
        load_dataset(name, "train", clips=True, caption_column=None)
    with open(f"{root}/e.npy", "wb") as fh:
        fh.write(b"")
    os.rename(f"{root}/e.npy", f"{root}/e.npz")
    with pytest.raises(DataError, match=r"cannot read clip .*e\.npz"):
        load_dataset(name, "train", clips=True, caption_column=None)
    os.remove(f"{root}/e.npz")
    np.savez(f"{root}/e.npz", x=_frames(4), y=_frames(5))
    with pytest.raises(DataError, match=r"clip .*e\.npz holds arrays \['x', 'y'\] but none named 'frames'"):
        load_dataset(name, "train", clips=True, caption_column=None)
    os.remove(f"{root}/e.npz")

    _save(f"{root}/stray.png", _frames(0)[0])
    with pytest.raises(DataError, match=r"stray\.png is a single image directly under"):
        load_dataset(name, "train", clips=True)
    os.remove(f"{root}/stray.png")
    os.makedirs(f"{root}/empty")
    with pytest.raises(DataError, match=r"clip folder .*empty holds no frame images"):
        load_dataset(name, "train", clips=True)
    os.rmdir(f"{root}/empty")
    _save(f"{root}/c_folder/11.png", _frames(0, h=9)[0])
    with pytest.raises(DataError, match=r"frame .*c_folder/11\.png is 8x9.*resolution="):
        load_dataset(name, "train", clips=True)
    with pytest.raises(DataError, match="num_frames is an option of clip folders"):
        load_dataset(name, "train", num_frames=2)
    with pytest.raises(DataError, match="does not take fields"):
        load_dataset(name, "train", clips=True, fields=("frames",))
    with pytest.raises(DataError, match="num_frames must be an int >= 1"):
        load_dataset(name, "train", clips=True, num_frames=0)


# ----------------------------------------------------------------------------------------------
# named TFDS datasets with further fields
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paired_tfds(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("paired_tfds"))
    paired_builder.prepare(path)
    return path


def test_tfds_dataset_keeps_every_field(paired_tfds):
    ds = load_dataset("jaxgen_test_paired", "train", data_dir=paired_tfds)
    n = paired_builder.NUM_TRAIN
    assert ds.images.shape == (n, 8, 8, 3)
    assert {k: v.shape for k, v in ds.arrays.items()} == {
        "source": (n, 8, 8, 1), "low_res": (n, 4, 4, 3), "frames": (n, 4, 8, 8, 3)}
    assert set(ds.texts) == {"edit_prompt"} and ds.class_names == ("even", "odd")
    for i in range(n):  # examples come back in storage order; each one's fields belong together
        j = int(ds.captions[i].split()[-1])
        want = paired_builder.example(j)
        assert ds.texts["edit_prompt"][i] == f"make it {j}" and ds.labels[i] == j % 2
        assert np.array_equal(ds.images[i], want["image"])
        for key in ("source", "low_res", "frames"):
            assert np.array_equal(ds.arrays[key][i], want[key]), key
    small = load_dataset("jaxgen_test_paired", "train", data_dir=paired_tfds, resolution={"frames": 4, "image": 2})
    assert small.images.shape == (n, 2, 2, 3) and small.arrays["frames"].shape == (n, 4, 4, 4, 3)
    assert small.arrays["low_res"].shape == (n, 4, 4, 3)
    every = load_dataset("jaxgen_test_paired", "train", data_dir=paired_tfds, resolution=2)
    assert every.arrays["source"].shape == (n, 2, 2, 1) and every.arrays["frames"].shape == (n, 4, 2, 2, 3)
    with pytest.raises(DataError, match=r"resolution names field\(s\) \['nope'\]"):
        load_dataset("jaxgen_test_paired", "train", data_dir=paired_tfds, resolution={"nope": 2})
    with pytest.raises(DataError, match="max_bytes"):
        load_dataset("jaxgen_test_paired", "train", data_dir=paired_tfds, max_bytes=1000)
    with pytest.raises(DataError, match=r"does not take option\(s\) \['fields'\]"):
        load_dataset("jaxgen_test_paired", "train", data_dir=paired_tfds, fields=("source",))


# ----------------------------------------------------------------------------------------------
# fields.gather on such datasets
# ----------------------------------------------------------------------------------------------


def test_gather_named_fields(paired):
    ds = load_dataset(f"folder:{paired}", "train", fields=("source", "image"), grayscale=("source",),
                      text_columns=("edit_prompt",))
    inputs = {"image": Input("image", (16, 16, 3)), "source": Input("image", (16, 16, 1)),
              "edit_prompt": Input("text"), "control": Input("image", (16, 16, 3), optional=True)}
    got = gather(ds, inputs)
    assert set(got) == {"image", "source", "edit_prompt"} and got["source"].shape == (3, 16, 16, 1)
    assert got["edit_prompt"] == ["edit a", "edit b", "edit c"]
    with pytest.raises(DataError) as info:
        gather(ds, {"image": Input("image", (16, 16, 3)), "control": Input("image", (16, 16, 3), doc="edges")})
    msg = str(info.value)
    assert "missing field(s) 'control'" in msg and "edges" in msg
    assert "it has image, caption, source, edit_prompt" in msg
    with pytest.raises(DataError, match=r"'source' is uint8 \[3, 16, 16, 1\]; this task takes uint8 \[N, 16, 16, 3\]"):
        gather(ds, {"source": Input("image", (16, 16, 3))})
