"""``load_dataset``: one entry point for embedded, TFDS and image-folder datasets.

Names:

- ``"digits"``, ``"shapes"``, ``"photos"``: jaxgen's embedded datasets (``jaxgen.data.digits``,
  ``jaxgen.data.shapes``, ``jaxgen.data.photos``). Prepared on first use, offline and without
  TensorFlow, by the TFDS builders in ``jaxgen.data.builders`` into ``data_dir`` (default:
  ``$JAXGEN_DATA_DIR``, else ``~/.cache/jaxgen/tensorflow_datasets``, so jaxgen's own data stay
  out of the user's TFDS directory); later calls read the prepared ArrayRecord files.
  Preparation holds a file lock in ``data_dir``, so processes sharing it (several hosts,
  parallel tests) prepare once.
- ``"folder:/path"``: an image folder, a paired-image folder (``fields=``) or a clip folder
  (``clips=True``), see ``jaxgen.data.folder``; ``data_dir`` is not used.
- any other name: a TFDS dataset (``"mnist"``, ``"cifar10"``, ``"mnist:3.0.1"``, ...) already
  prepared in ``data_dir`` (default: ``$JAXGEN_DATA_DIR``, else TFDS's own default,
  ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) in a random-access format (ArrayRecord).
  jaxgen never downloads: a missing dataset is a DataError saying where it looked and how to
  provide it. Besides the image, label and caption, every uint8 image-like feature ([H, W, C] or
  [F, H, W, C]) and every Text feature is kept by its feature name (``ds.arrays``, ``ds.texts``).

Everything is read through ``builder.as_data_source()``, which never imports TensorFlow, and held
in memory as an ``ArrayDataset``.
"""
from __future__ import annotations

import collections
import contextlib
import os

import numpy as np

from jaxgen.data import digits, photos, shapes
from jaxgen.data.dataset import ArrayDataset
from jaxgen.errors import DataError

EMBEDDED = ("digits", "shapes", "photos")
FOLDER_PREFIX = "folder:"
FOLDER_OPTIONS = ("resolution", "caption_column", "text_columns", "fields", "grayscale", "clips",
                  "num_frames")
DEFAULT_MAX_BYTES = 8 * 2**30  # refuse to hold more than this many image bytes in memory
_READ_CHUNK = 4096  # examples decoded per data-source call
# Decoded splits kept per process (the stages of a multi-stage run, its tokenizer and its
# evaluation read the same split; decoding the shapes train split takes about 1.5 s each time).
_DECODED: collections.OrderedDict = collections.OrderedDict()
_DECODED_MAX = 8


def default_data_dir() -> str:
    """Where embedded datasets are prepared: $JAXGEN_DATA_DIR, else ~/.cache/jaxgen/tensorflow_datasets."""
    env = os.environ.get("JAXGEN_DATA_DIR")
    return os.path.expanduser(env if env else os.path.join("~", ".cache", "jaxgen", "tensorflow_datasets"))


def tfds_data_dir() -> str:
    """Where named TFDS datasets are looked for: $JAXGEN_DATA_DIR, else $TFDS_DATA_DIR, else
    ~/tensorflow_datasets (TFDS's own default)."""
    env = os.environ.get("JAXGEN_DATA_DIR") or os.environ.get("TFDS_DATA_DIR")
    return os.path.expanduser(env if env else os.path.join("~", "tensorflow_datasets"))


def load_dataset(name: str, split: str, data_dir: str | None = None, **options) -> ArrayDataset:
    """Load a dataset split into memory.

    name: "digits" | "shapes" | "photos" | "folder:/path/to/images" | a TFDS name prepared in data_dir.
    split: "train" | "test"; shapes also "heldout" (its 18 held-out attribute combinations);
      TFDS split strings ("validation", "train[:10%]") pass through to TFDS.
    data_dir: see the module docstring for the defaults.
    options, by dataset:
      shapes: seed (int, default 0): jitter seed; num_examples: int (size of the requested
        split) or {split: int}; defaults train 6,480, test 1,620, heldout 180. Each distinct
        setting is prepared once, in its own directory. masks (bool): add ds.arrays["mask"],
        uint8 [N, 32, 32, 1], 255 on the shape, 0 elsewhere (a ControlNet's control image).
        edits (bool): instruction-editing triplets (``shapes.edit_triplets``): each example's image
        becomes ds.arrays["source"], ds.texts["instruction"] changes one attribute, and images,
        captions, labels and attributes are those of the edited image.
        geometry: "grid" (default, the generator's images as prepared by the TFDS builder) or
        "continuous" (``shapes_render.continuous_split``, generated in memory: sub-pixel centres
        and widths within the spec, half the generator's rasterisation, half pixel-centre
        sampling; seed and num_examples as above; masks apply, edits and moving do not).
        moving (int F >= 2): moving-shapes clips instead (``shapes.moving_clips``, generated in
        memory, not by the TFDS builder; splits train and test, seed and num_examples as above):
        ds.arrays["frames"] uint8 [N, F, 32, 32, 3], captions ("a red circle moving right"),
        attributes shape/color/size/direction; no images or labels.
      folder (layouts in ``jaxgen.data.folder``):
        resolution: int or (height, width) for every image field, or {field: int or (h, w)}
          for some (the others keep their size): resize + center-crop.
        caption_column: the metadata.jsonl key of the captions ("text"); None: no captions.
        text_columns: further metadata.jsonl keys read as text fields, e.g. ("edit_prompt",)
          -> ds.texts["edit_prompt"], list of N str.
        fields: paired / n-tuple folders, e.g. ("source", "image"): one subfolder per field
          with the same file names -> "image" as ds.images [N, H, W, C], the others as
          ds.arrays[field] uint8 [N, H_f, W_f, C_f].
        grayscale: fields stored as luma [..., 1] instead of RGB, e.g. ("source",);
          ("image",) for a single-image folder, ("frames",) for clips.
        clips: True: each example is a subfolder of frames or a .npy/.npz clip ->
          ds.arrays["frames"] uint8 [N, F, H, W, C], ds.images None.
        num_frames: clips only: keep the first K frames of each clip (default: all; then all
          clips must have the same count).
      TFDS names: resolution (as for folders, applied to every image-like feature; needed when
        image sizes vary), max_bytes (memory cap on all image bytes, default 8 GiB).
    Returns an ArrayDataset: images uint8 [N, H, W, C]; digits [N, 8, 8, 1] with labels 0-9 and
    captions; shapes [N, 32, 32, 3] with labels = combination index (180 classes), captions and
    attributes shape/color/size/position; photos [N, 32, 32, 3] with labels = photo (china 0,
    flower 1) and attributes top/left (4,096 train, 512 test patches); folders [N, H, W, 3] with
    captions if metadata.jsonl exists (paired folders and clips: see the options above); TFDS
    datasets their "image" feature as images (else the only uint8 [H, W, C] feature, else none),
    every other uint8 Image/Tensor/Video feature of shape [H, W, C] or [F, H, W, C] as
    ds.arrays[feature] [N, ...], "label" (ClassLabel) as labels, "caption"/"text" (Text) as
    captions and every other Text feature as ds.texts[feature] (list of N str). Raises DataError
    for unknown names/splits/options and missing data.
    """
    if not isinstance(name, str) or not isinstance(split, str):
        raise DataError(f"load_dataset(name, split) takes strings, got {name!r}, {split!r}")
    if name.startswith(FOLDER_PREFIX):
        from jaxgen.data.folder import load_folder

        _check_options(name, options, FOLDER_OPTIONS)
        return load_folder(name[len(FOLDER_PREFIX):], split, **options)
    if name == "digits":
        _check_options(name, options, ())
        return _load_digits(split, data_dir or default_data_dir())
    if name == "shapes":
        _check_options(name, options, ("seed", "num_examples", "masks", "edits", "moving", "geometry"))
        return _load_shapes(split, data_dir or default_data_dir(), **options)
    if name == "photos":
        _check_options(name, options, ())
        return _load_photos(split, data_dir or default_data_dir())
    _check_options(name, options, ("resolution", "max_bytes"))
    return _load_tfds(name, split, data_dir or tfds_data_dir(), **options)


def _check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"load_dataset({name!r}) does not take option(s) {unknown}; "
                        f"it takes {list(allowed) if allowed else 'no options'}")


# ----------------------------------------------------------------------------------------------
# Embedded datasets
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _file_lock(path: str):
    """Exclusive advisory lock on ``path`` (created if needed), held for the with-block."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_embedded(name: str, data_dir: str | None = None, *, seed: int = 0, num_examples: dict | None = None):
    """Prepare (once) and return the TFDS builder of an embedded dataset.

    name: "digits", "shapes" or "photos"; seed, num_examples ({split: count}): shapes only.
    Returns a prepared ``tfds.core.DatasetBuilder`` (ArrayRecord files in data_dir).
    """
    import tensorflow_datasets as tfds

    from jaxgen.data import builders

    data_dir = data_dir or default_data_dir()
    if name in ("digits", "photos"):
        if seed != 0 or num_examples:
            raise DataError(f"{name} has a fixed split; seed and num_examples are options of 'shapes' only")
        cls = builders.JaxgenDigits if name == "digits" else builders.JaxgenPhotos
        config, lock_name = None, f".jaxgen_{name}.lock"
    elif name == "shapes":
        cls, config = builders.JaxgenShapes, builders.ShapesConfig.make(seed, num_examples)
        lock_name = f".jaxgen_shapes-{config.name}.lock"
        if config.name in cls.builder_configs:  # TFDS wants its listed configs by name
            config = config.name
    else:
        raise DataError(f"{name!r} is not an embedded dataset; those are {EMBEDDED}")

    def make():
        return cls(config=config, data_dir=data_dir, file_format="array_record")

    builder = make()
    if builder.is_prepared():
        return builder
    try:
        os.makedirs(data_dir, exist_ok=True)
        lock = os.path.join(data_dir, lock_name)
        with _file_lock(lock):
            builder = make()  # another process may have prepared it while we waited
            if not builder.is_prepared():
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(
                        try_download_gcs=False,
                        compute_stats=tfds.download.ComputeStatsMode.SKIP,
                    )
                )
    except OSError as e:
        raise DataError(f"cannot prepare {name!r} in {data_dir}: {e}; pass a writable data_dir= "
                        "or set JAXGEN_DATA_DIR") from e
    return builder


def _split_files(builder, split: str) -> tuple:
    """The cache key of a decoded split: the dataset folder, the split and the (name, size,
    modification time) of every file stored there, so a re-prepared dataset is read afresh."""
    folder = builder.data_dir
    with os.scandir(folder) as entries:
        files = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()))
    return folder, split, files


def _read_all(builder, split: str, where: str) -> list[dict]:
    """Every example of a split, decoded (Text as bytes), via the no-TensorFlow data source.
    The decoded examples are kept for the process (``_DECODED``, the last ``_DECODED_MAX``
    splits) with their arrays read-only; callers get a new list of the same examples."""
    key = _split_files(builder, split)
    if key in _DECODED:
        _DECODED.move_to_end(key)
        return list(_DECODED[key])
    try:
        source = builder.as_data_source(split=split)
    except (ValueError, KeyError) as e:
        raise DataError(f"{where}: cannot open split {split!r} ({e}); available splits: "
                        f"{sorted(builder.info.splits)}") from e
    n = len(source)
    out = []
    for start in range(0, n, _READ_CHUNK):
        out.extend(source.__getitems__(list(range(start, min(n, start + _READ_CHUNK)))))
    for example in out:
        for value in example.values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
    _DECODED[key] = out
    while len(_DECODED) > _DECODED_MAX:
        _DECODED.popitem(last=False)
    return list(out)


def _ordered(examples: list[dict]) -> list[dict]:
    """Examples sorted by their stored "index" (TFDS stores them in hashed-key order)."""
    return sorted(examples, key=lambda e: int(e["index"]))


def _load_digits(split: str, data_dir: str) -> ArrayDataset:
    builder = prepare_embedded("digits", data_dir)
    examples = _ordered(_read_all(builder, split, "digits"))
    n = len(examples)
    return ArrayDataset(
        images=np.stack([e["image"] for e in examples]) if n else np.zeros((0,) + digits.IMAGE_SHAPE, np.uint8),
        labels=np.asarray([e["label"] for e in examples], np.int32),
        captions=[e["caption"].decode("utf-8") for e in examples],
        name="digits",
        split=split,
        num_classes=digits.NUM_CLASSES,
        class_names=digits.DIGIT_WORDS,
    )


def _load_photos(split: str, data_dir: str) -> ArrayDataset:
    builder = prepare_embedded("photos", data_dir)
    examples = _ordered(_read_all(builder, split, "photos"))
    if not examples:
        raise DataError(f"photos split {split!r} is empty")
    return ArrayDataset(
        images=np.stack([e["image"] for e in examples]),
        labels=np.asarray([e["label"] for e in examples], np.int32),
        attributes={a: np.asarray([e[a] for e in examples], np.int32) for a in ("top", "left")},
        name="photos",
        split=split,
        num_classes=len(photos.PHOTOS),
        class_names=photos.PHOTOS,
    )


def _load_shapes(split: str, data_dir: str, seed: int = 0, num_examples=None, masks: bool = False,
                 edits: bool = False, moving=None, geometry: str = "grid") -> ArrayDataset:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"shapes seed must be an int >= 0, got {seed!r}")
    if num_examples is None:
        counts = {}
    elif isinstance(num_examples, dict):
        counts = dict(num_examples)
    elif isinstance(num_examples, (int, np.integer)) and not isinstance(num_examples, bool):
        if split not in shapes.SPLITS:
            raise DataError(f"num_examples as an int sets the size of split {split!r}, which is not one of "
                            f"{shapes.SPLITS}; pass a dict {{split: count}}")
        counts = {split: int(num_examples)}
    else:
        raise DataError(f"num_examples must be an int or a dict {{split: count}}, got {num_examples!r}")
    for s, c in counts.items():
        if s not in shapes.SPLITS or isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
            raise DataError(f"num_examples entries must map a split in {shapes.SPLITS} to an int >= 1, "
                            f"got {s!r}: {c!r}")
    counts = {s: int(c) for s, c in counts.items()}
    if geometry != "grid":
        return _load_continuous_shapes(split, int(seed), counts.get(split), geometry, masks,
                                       edits or moving is not None)
    if moving is not None:
        return _load_moving_shapes(split, int(seed), counts.get(split), moving, masks or edits)
    builder = prepare_embedded("shapes", data_dir, seed=int(seed), num_examples=counts)
    examples = _ordered(_read_all(builder, split, "shapes"))
    n = len(examples)
    for option, value in (("masks", masks), ("edits", edits)):
        if not isinstance(value, (bool, np.bool_)):
            raise DataError(f"shapes option {option}={value!r} must be True or False.")
    images = np.stack([e["image"] for e in examples]) if n else np.zeros((0, 32, 32, 3), np.uint8)
    captions = [e["caption"].decode("utf-8") for e in examples]
    attributes = {a: np.asarray([e[a] for e in examples], np.int32) for a in shapes.ATTRIBUTES}
    labels = np.asarray([e["label"] for e in examples], np.int32)
    arrays, texts = {}, {}
    if edits:
        jitter = np.asarray([e["jitter"] for e in examples], np.int32).reshape(n, 3)
        trip = shapes.edit_triplets({**attributes, "jitter": jitter}, int(seed), split)
        arrays["source"], texts["instruction"] = trip["source"], trip["instruction"]
        images, captions, attributes = trip["image"], trip["caption"], trip["target"]
        labels = shapes.combination_index(*(attributes[a] for a in shapes.ATTRIBUTES))
    if masks:
        arrays["mask"] = shapes.shape_masks(images)
    return ArrayDataset(
        images=images,
        arrays=arrays,
        texts=texts,
        labels=labels,
        captions=captions,
        attributes=attributes,
        name="shapes",
        split=split,
        num_classes=shapes.NUM_COMBINATIONS,
        class_names=shapes.CLASS_NAMES,
    )


def _load_moving_shapes(split: str, seed: int, num, num_frames, other_options: bool) -> ArrayDataset:
    """shapes with moving=F: ``shapes.moving_clips`` of the split (default size as the images')."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 2:
        raise DataError(f"shapes option moving={num_frames!r}: give the clips' frame count, an int >= 2.")
    if other_options:
        raise DataError("shapes option moving=F makes clips; masks and edits apply to images: drop them.")
    if split not in ("train", "test"):
        raise DataError(f"moving shapes have splits 'train' and 'test' (no held-out combinations), not {split!r}.")
    clips = shapes.moving_clips(shapes.DEFAULT_NUM_EXAMPLES[split] if num is None else num, seed, int(num_frames),
                                split=split)
    return ArrayDataset(arrays={"frames": clips["frames"]}, captions=clips["caption"],
                        attributes={a: clips[a] for a in shapes.CLIP_ATTRIBUTES}, name="shapes", split=split)


def _load_continuous_shapes(split: str, seed: int, num, geometry, masks, other_options: bool) -> ArrayDataset:
    """shapes with geometry="continuous": ``shapes_render.continuous_split`` of the split, in memory."""
    from jaxgen.data import shapes_render

    if geometry not in shapes_render.GEOMETRIES:
        raise DataError(f"shapes option geometry={geometry!r}: use one of {shapes_render.GEOMETRIES}.")
    if other_options:
        raise DataError("shapes option geometry='continuous' draws single images: drop edits and moving.")
    if not isinstance(masks, (bool, np.bool_)):
        raise DataError(f"shapes option masks={masks!r} must be True or False.")
    if split not in shapes.SPLITS:
        raise DataError(f"shapes has splits {shapes.SPLITS}, not {split!r}.")
    data = shapes_render.continuous_split(split, num, seed)
    return ArrayDataset(images=data["image"], arrays={"mask": shapes.shape_masks(data["image"])} if masks else {},
                        labels=data["label"], captions=data["caption"],
                        attributes={a: data[a] for a in shapes.ATTRIBUTES}, name="shapes", split=split,
                        num_classes=shapes.NUM_COMBINATIONS, class_names=shapes.CLASS_NAMES)


# ----------------------------------------------------------------------------------------------
# Named TFDS datasets
# ----------------------------------------------------------------------------------------------

def _how_to_provide(name: str, data_dir: str) -> str:
    base = name.split(":")[0].split("/")[0]
    return (
        "jaxgen never downloads data. To provide it: on a machine with network access and TensorFlow run\n"
        f"    tfds build {base} --file_format=array_record --data_dir=/some/dir\n"
        f"(or tfds.builder({base!r}, data_dir='/some/dir').download_and_prepare(file_format='array_record')),\n"
        f"then copy /some/dir/{base} into {data_dir}, or pass data_dir= (or set JAXGEN_DATA_DIR) to the folder "
        "that holds it. Offline alternatives: 'digits', 'shapes', or 'folder:/path/to/images'."
    )


def _load_tfds(name: str, split: str, data_dir: str, resolution=None,
               max_bytes: int = DEFAULT_MAX_BYTES) -> ArrayDataset:
    import tensorflow_datasets as tfds

    from jaxgen.data.folder import field_resolutions

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"unknown dataset {name!r}: not an embedded dataset {EMBEDDED}, not 'folder:/path', "
                        f"and neither a TFDS dataset nor prepared in {data_dir}.\n"
                        + _how_to_provide(name, data_dir)) from e
    except ImportError as e:
        raise DataError(f"the TFDS builder of {name!r} needs a module that is not installed ({e}); "
                        "prepare it elsewhere and copy the prepared folder into data_dir") from e
    if not builder.is_prepared():
        base_dir = os.path.join(data_dir, builder.name)
        found = sorted(os.listdir(base_dir)) if os.path.isdir(base_dir) else []
        raise DataError(f"TFDS dataset {name!r} is not prepared in {data_dir} (looked for {builder.data_dir}; "
                        f"found there: {found or 'nothing'}).\n" + _how_to_provide(name, data_dir))
    random_access = set(tfds.core.file_adapters.FileFormat.with_random_access())
    formats = set(builder.info.available_file_formats())
    if not formats & random_access:
        raise DataError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as {sorted(f.value for f in formats)}, which "
            "cannot be read without TensorFlow; jaxgen reads ArrayRecord. Re-prepare it with "
            f"--file_format=array_record (on a machine with TensorFlow: `tfds build {builder.name} "
            "--file_format=array_record`) and copy it here."
        )
    features = builder.info.features
    array_keys = _image_like_features(features)   # uint8 rank-3/4 features, by name
    image_key = _image_key(name, features, array_keys)
    label_feature = features["label"] if "label" in features.keys() else None
    has_labels = isinstance(label_feature, tfds.features.ClassLabel)
    caption_key = next((k for k in ("caption", "text") if k in features.keys()
                        and isinstance(features[k], tfds.features.Text)), None)
    text_keys = [k for k in features.keys() if k != caption_key and isinstance(features[k], tfds.features.Text)]
    targets = field_resolutions(resolution, array_keys)

    try:
        source = builder.as_data_source(split=split)
    except (ValueError, KeyError) as e:
        raise DataError(f"TFDS dataset {name!r}: cannot open split {split!r} ({e}); available splits: "
                        f"{sorted(builder.info.splits)}") from e
    n = len(source)
    per_example = 0
    for key in array_keys:
        shape = tuple(features[key].shape)
        shape = shape + (1,) if len(shape) == 2 else shape  # a [H, W] "image" is read as [H, W, 1]
        if targets[key] is not None:
            shape = shape[:-3] + targets[key] + shape[-1:]
        per_example = None if per_example is None or None in shape else per_example + int(np.prod(shape))
    if per_example is not None and n * per_example > max_bytes:
        raise DataError(f"{name!r} split {split!r} holds {n} examples of {per_example} image bytes ({array_keys}) = "
                        f"{n * per_example / 2**30:.1f} GiB, over max_bytes={max_bytes}; load a slice "
                        f"(e.g. '{split}[:10%]') or raise max_bytes")
    arrays = {k: [] for k in array_keys}
    labels, captions, texts, total = [], [], {k: [] for k in text_keys}, 0
    for start in range(0, n, _READ_CHUNK):
        for j, ex in enumerate(source.__getitems__(list(range(start, min(n, start + _READ_CHUNK)))), start):
            for key in array_keys:
                x = _image_value(name, j, key, ex[key], targets[key], main=key == image_key)
                if arrays[key] and x.shape != arrays[key][0].shape:
                    fix = "resolution=" if key == image_key else f"resolution={{{key!r}: size}} (or one int for all)"
                    raise DataError(f"{name!r} example {j}: feature {key!r} is {x.shape} but example 0 has "
                                    f"{arrays[key][0].shape}; pass {fix} to resize and center-crop it to one size")
                total += x.nbytes
                arrays[key].append(x)
            if total > max_bytes:
                raise DataError(f"{name!r} split {split!r} exceeds max_bytes={max_bytes} after {j + 1} of {n} "
                                f"examples; load a slice (e.g. '{split}[:10%]') or raise max_bytes")
            if has_labels:
                labels.append(int(ex["label"]))
            if caption_key is not None:
                captions.append(ex[caption_key].decode("utf-8"))
            for key in text_keys:
                texts[key].append(ex[key].decode("utf-8"))
    if n == 0:
        raise DataError(f"TFDS dataset {name!r} split {split!r} is empty")
    stacked = {k: np.stack(v) for k, v in arrays.items()}
    return ArrayDataset(
        images=stacked.pop(image_key) if image_key is not None else None,
        labels=np.asarray(labels, np.int32) if has_labels else None,
        captions=captions if caption_key is not None else None,
        arrays=stacked,
        texts=texts,
        name=name,
        split=split,
        num_classes=int(label_feature.num_classes) if has_labels else None,
        class_names=tuple(label_feature.names) if has_labels else None,
    )


def _is_uint8(dtype) -> bool:
    try:
        return np.dtype(dtype) == np.uint8
    except (TypeError, ValueError, KeyError):
        return False


def _image_like_features(features) -> list[str]:
    """Names of the uint8 Image / Tensor / Video features of rank 3 ([H, W, C]) or 4 ([F, H, W, C])
    per example, plus a uint8 [H, W] "image" (read as [H, W, 1])."""
    import tensorflow_datasets as tfds

    kinds = (tfds.features.Image, tfds.features.Tensor, tfds.features.Sequence)  # Video is a Sequence
    keys = []
    for k in features.keys():
        f = features[k]
        if not isinstance(f, kinds) or isinstance(f, tfds.features.Text):
            continue
        try:
            if not isinstance(f.shape, (tuple, list)):
                continue
            shape = tuple(f.shape)
            if not (len(shape) in (3, 4) or (k == "image" and len(shape) == 2)):
                continue
            dtype = f.np_dtype  # not .dtype, which imports TensorFlow
        except (AttributeError, TypeError, ValueError):
            continue
        if _is_uint8(dtype):
            keys.append(k)
    return keys


def _image_key(name: str, features, array_keys: list[str]) -> str | None:
    """The feature that becomes ``ds.images``: "image", else the only image-like feature when it
    is [H, W, C]; None when the others are all kept by name (e.g. a dataset of "lr"/"hr" pairs)."""
    if "image" in features.keys():
        if "image" not in array_keys:
            raise DataError(f"TFDS dataset {name!r}: feature 'image' is {features['image']!r}; jaxgen needs uint8 "
                            "[H, W, C] images")
        return "image"
    if not array_keys:
        raise DataError(f"TFDS dataset {name!r} has no image feature (features: {list(features.keys())}); "
                        "jaxgen reads uint8 Image / Tensor / Video features of shape [H, W, C] or [F, H, W, C]")
    if len(array_keys) == 1 and len(features[array_keys[0]].shape) == 3:
        return array_keys[0]
    return None


def _image_value(name: str, j: int, key: str, value, target, main: bool) -> np.ndarray:
    """One example's uint8 [H, W, C] or [F, H, W, C] of feature ``key``, resized to ``target``."""
    from jaxgen.data.folder import resize_center_crop

    x = np.asarray(value)
    if main and x.ndim == 2:
        x = x[..., None]  # [H, W] -> [H, W, 1]
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (main and (x.ndim != 3 or x.shape[-1] not in (1, 3))):
        want = "[H, W, 1 or 3]" if main else "[H, W, C] or [F, H, W, C]"
        raise DataError(f"{name!r} example {j}: feature {key!r} is {x.dtype} {list(x.shape)}; jaxgen reads it as "
                        f"uint8 {want} images")
    if target is None:
        return x
    if x.shape[-1] not in (1, 3):
        raise DataError(f"{name!r} example {j}: feature {key!r} is {list(x.shape)} with {x.shape[-1]} channels, "
                        "which cannot be resized; give resolution as a dict {field: size} without it")
    if x.ndim == 3:
        return resize_center_crop(x, target)
    return np.stack([resize_center_crop(frame, target) for frame in x])
