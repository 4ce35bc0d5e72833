"""Image folders: ``load_dataset("folder:/path/to/images", split, **options)``.

Three layouts; in all of them the split root is ``/path/<split>/`` when the folder has a subfolder
named like the split (``train/``, ``test/``, ...), otherwise the whole folder is the ``train``
split and other splits are an error (so is a folder with a ``test/`` but no ``train/``
subfolder, which would mix them). Files and directories whose name starts with "." are ignored.

1. Single images (default; the convention of diffusers' training scripts and Hugging Face
   ``imagefolder``): image files ``*.png``, ``*.jpg``, ``*.jpeg``, ``*.webp`` (any case), found
   recursively, examples sorted by relative path; optional ``metadata.jsonl`` files, one JSON
   object per line with ``file_name`` (relative to that metadata file's folder) and ``text`` (the
   caption column; ``caption_column=`` picks another key, ``text_columns=`` reads more keys as
   text fields). When any metadata file exists, every image needs exactly one line.
   -> images uint8 [N, H, W, 3].

2. Paired (or n-tuple) images, ``fields=("source", "image")``: one subfolder per field under the
   split root, named after the field (``source/``, ``image/``, ``control/``, ...), holding files
   with the same relative paths in every field folder; extensions may differ (``source/a.jpg``
   pairs with ``image/a.png``: files match by relative path without extension). A file without a
   counterpart in every field folder is an error. Optional ``metadata.jsonl`` at the split root
   (not inside the field folders): ``file_name`` relative to a field folder, without the field
   folder and with or without extension (``"a.png"`` or ``"a"``), the caption column and any
   ``text_columns``, e.g. ``{"file_name": "a.png", "text": "a cat", "edit_prompt": "make it blue"}``.
   -> the field "image" as images uint8 [N, H, W, C], every other field as
   ``arrays[field]`` uint8 [N, H_f, W_f, C_f]; each field's images share one size, fields may
   differ (low_res 8x8 beside image 32x32).

3. Clips, ``clips=True``: each example directly under the split root is either a subfolder of
   frame images (sorted by file name, numbers by value: ``000.png, 001.png, ...``) or a ``.npy``
   file of uint8 [F, H, W, C] (C = 1 or 3; [F, H, W] is read as C = 1) or a ``.npz`` file holding
   such an array under the key ``frames`` (else its only array); sorted by name. Every clip has
   the same shape (``num_frames=K`` keeps the first K frames of each; a shorter clip is an
   error). Optional ``metadata.jsonl`` at the split root with ``file_name`` = the clip's folder
   name or .npy/.npz file name. -> ``arrays["frames"]`` uint8 [N, F, H, W, C], images None.

Images are decoded with Pillow and converted to RGB uint8: the EXIF orientation is applied;
grayscale, palette, CMYK and other 8-bit modes are converted with Pillow's ``convert("RGB")``;
images with an alpha channel (RGBA, LA, palette transparency) are composited over white; 16-bit
grayscale keeps its top 8 bits. Fields named in ``grayscale=`` (e.g. ``("source",)``, or
``("frames",)`` for clips) are then stored as luma [..., H, W, 1] (Pillow's ``convert("L")``).
Without ``resolution`` all images of a field must have the size of its first one; with
``resolution`` (an int or (height, width) for every field, or a dict {field: size} for some)
each image or frame is resized (bilinear, antialiased) so it covers the target and then
center-cropped, as diffusers' ``Resize(resolution) + CenterCrop(resolution)``.
"""
from __future__ import annotations

import json
import os
import re
import struct
import zipfile

import numpy as np

from jaxgen.data.dataset import ArrayDataset
from jaxgen.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
_SPLIT_DIRS = ("train", "test", "validation", "heldout")
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def resolution_hw(resolution) -> tuple[int, int]:
    """An int or (height, width) -> (height, width), both positive; else a DataError."""
    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
        h = w = int(resolution)
    elif isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        h, w = (int(r) for r in resolution)
    else:
        raise DataError(f"resolution must be an int or (height, width), got {resolution!r}")
    if h <= 0 or w <= 0:
        raise DataError(f"resolution must be positive, got {resolution!r}")
    return h, w


def resize_center_crop(image: np.ndarray, resolution) -> np.ndarray:
    """Resize so the image covers ``resolution``, then center-crop to it.

    image: uint8 [H, W, C] (C = 1 or 3). resolution: int (square) or (height, width).
    Returns uint8 [height, width, C]. The resize is bilinear with antialiasing (Pillow), the crop
    offset ``round((size - target) / 2)`` as torchvision's ``CenterCrop``.
    """
    from PIL import Image

    th, tw = resolution_hw(resolution)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise DataError(f"resize_center_crop expects uint8 [H, W, 1 or 3], got {image.dtype} {image.shape}")
    h, w, c = image.shape
    if (h, w) == (th, tw):
        return image
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    resized = np.asarray(pil.resize((nw, nh), Image.Resampling.BILINEAR))  # [nh, nw(, 3)]
    top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
    out = resized[top:top + th, left:left + tw]
    return out[..., None] if c == 1 else out


def read_image(path: str, grayscale: bool = False) -> np.ndarray:
    """Decode one image file to RGB: uint8 [H, W, 3], or with ``grayscale`` to luma [H, W, 1]
    (the RGB image through Pillow's convert("L"); exact for grey files). Raises DataError naming
    the file when it is unreadable, corrupt or in an unsupported mode (32-bit integer or float)."""
    rgb = _read_rgb(path)
    return _to_luma(rgb) if grayscale else rgb


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated or corrupt files fail here
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}; remove or replace this file") from e
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)  # [H, W] top 8 bits
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in _ALPHA_MODES or (mode in _EIGHT_BIT_MODES and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode in _EIGHT_BIT_MODES:
        return np.asarray(img.convert("RGB"))
    raise DataError(f"image {path} has Pillow mode {mode!r}, which jaxgen does not convert; "
                    "save it as 8-bit RGB or grayscale")


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _scan(root: str) -> tuple[list[str], list[str]]:
    """Sorted image paths and metadata.jsonl paths under root (hidden entries skipped)."""
    images, metadata = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith("."):
                continue
            full = os.path.join(dirpath, f)
            if f == METADATA_FILE:
                metadata.append(full)
            elif f.lower().endswith(IMAGE_EXTENSIONS):
                images.append(full)
    return sorted(images, key=lambda p: _rel(p, root)), sorted(metadata, key=lambda p: _rel(p, root))


def _metadata_rows(meta: str, columns: tuple[str, ...]):
    """(line number, file_name, {column: text}) for every line of one metadata.jsonl file."""
    example = json.dumps({"file_name": "a.png", **{c: "..." for c in columns}})
    with open(meta, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{meta} line {lineno} is not valid JSON ({e}); each line must be an object "
                                f"like {example}") from e
            missing = [k for k in ("file_name", *columns) if not isinstance(row, dict) or k not in row]
            if missing:
                hint = ("" if missing == ["file_name"] else " (caption_column= names the caption key, None for no "
                        "captions; text_columns= the further keys)")
                raise DataError(f"{meta} line {lineno} needs the keys {['file_name', *columns]} (missing "
                                f"{missing}), got {line.strip()[:200]}; each line must be an object like "
                                f"{example}{hint}")
            if not isinstance(row["file_name"], str) or not row["file_name"]:
                raise DataError(f"{meta} line {lineno}: 'file_name' must be a non-empty string, got "
                                f"{row['file_name']!r}")
            for c in columns:
                if not isinstance(row[c], str):
                    raise DataError(f"{meta} line {lineno}: {c!r} must be a string, got {row[c]!r}")
            yield lineno, row["file_name"], {c: row[c] for c in columns}


def _read_metadata(files: list[str], columns: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Absolute normalised image path -> {column: text}, from metadata.jsonl files whose
    file_name is relative to the metadata file's folder (single-image folders)."""
    rows: dict[str, dict[str, str]] = {}
    for meta in files:
        base = os.path.dirname(meta)
        for lineno, file_name, values in _metadata_rows(meta, columns):
            path = os.path.normpath(os.path.join(base, file_name))
            if not os.path.isfile(path):
                raise DataError(f"{meta} line {lineno} names {file_name!r}, but {path} does not exist; "
                                "fix the file_name or remove the line")
            if path in rows:
                raise DataError(f"{meta} line {lineno}: {file_name!r} has a line already; keep one line per image")
            rows[path] = values
    return rows


def _split_root(path: str, split: str) -> str:
    """The folder holding ``split``: path/<split>/, or path itself for "train" without split folders."""
    if not os.path.isdir(path):
        raise DataError(f"image folder {path!r} does not exist or is not a directory; "
                        "use load_dataset('folder:/path/to/images', split)")
    root = os.path.join(path, split)
    if os.path.isdir(root):
        return root
    if split != "train":
        raise DataError(f"image folder {path} has no {split!r} subfolder; without split subfolders the whole "
                        "folder is the 'train' split")
    present = [d for d in _SPLIT_DIRS if os.path.isdir(os.path.join(path, d))]
    if present:
        raise DataError(f"image folder {path} has split subfolders {present} but no 'train' subfolder; "
                        "move the training images into train/ so splits do not mix")
    return path


def _names(option: str, value) -> tuple[str, ...]:
    """A tuple of distinct field/column names from a str, tuple or list (None: empty)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v for v in value):
        raise DataError(f"{option} must be a tuple of names, e.g. {option}=('source',), got {value!r}")
    if len(set(value)) != len(value):
        raise DataError(f"{option}={tuple(value)!r} names something twice; list each name once")
    return tuple(value)


def field_resolutions(resolution, fields) -> dict[str, tuple[int, int] | None]:
    """The target (height, width) of each image field, or None where it keeps its size.

    resolution: None, an int or (height, width) for every field, or a dict {field: int or
    (height, width)} (fields it leaves out keep their size; naming a field that is not loaded is
    an error listing the ones that are).
    """
    fields = tuple(fields)
    if resolution is not None and hasattr(resolution, "items"):
        per_field = dict(resolution.items())
        unknown = sorted(set(per_field) - set(fields))
        if unknown:
            raise DataError(f"resolution names field(s) {unknown} that are not loaded; the image fields are "
                            f"{list(fields)}: give resolution={{field: size}} for those, or one int for all")
        return {f: None if per_field.get(f) is None else resolution_hw(per_field[f]) for f in fields}
    target = None if resolution is None else resolution_hw(resolution)
    return {f: target for f in fields}


def _read_field_images(files: list[str], target, grey: bool, field: str | None) -> np.ndarray:
    """uint8 [N, H, W, C] (C = 1 when grey, else 3) of ``files``, resized to target or checked to
    share one size. field: the field name for messages (None for a single-image folder)."""
    arrays = []
    for f in files:
        img = read_image(f, grayscale=grey)  # [h, w, 3 or 1]
        if target is not None:
            img = resize_center_crop(img, target)
        elif arrays and img.shape[:2] != arrays[0].shape[:2]:
            fix = "resolution=" if field is None else f"resolution= (or resolution={{{field!r}: size}})"
            what = "images" if field is None else f"images of field {field!r}"
            raise DataError(f"image {f} is {img.shape[1]}x{img.shape[0]} (WxH) but {files[0]} is "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all {what} must share one size, "
                            f"or pass {fix} to resize and center-crop them")
        arrays.append(img)
    return np.stack(arrays)


def _texts_of(keys: list[str], rows: dict | None, caption_column: str | None, text_columns: tuple[str, ...],
              describe_missing) -> tuple[list[str] | None, dict[str, list[str]]]:
    """captions and {column: texts} for the examples ``keys`` from metadata ``rows`` (key ->
    {column: text}); every example needs a line when any metadata exists."""
    if rows is None:
        if text_columns:
            raise DataError(f"text_columns={text_columns} but there is no {METADATA_FILE}; "
                            + describe_missing([]))
        return None, {}
    missing = [k for k in keys if k not in rows]
    if missing:
        raise DataError(describe_missing(missing))
    captions = [rows[k][caption_column] for k in keys] if caption_column is not None else None
    return captions, {c: [rows[k][c] for k in keys] for c in text_columns}


def _check_columns(caption_column, text_columns: tuple[str, ...], fields: tuple[str, ...]) -> tuple[str, ...]:
    """The metadata columns to read; text column names must not clash with other fields."""
    if caption_column is not None and (not isinstance(caption_column, str) or not caption_column):
        raise DataError(f"caption_column must be a metadata key (str) or None, got {caption_column!r}")
    if caption_column in text_columns:
        raise DataError(f"text_columns lists {caption_column!r}, which is the caption_column (it becomes the "
                        "captions); leave it out of text_columns")
    clash = sorted(set(text_columns) & ({"image", "label", "caption", "frames"} | set(fields)))
    if clash:
        also = " (or read it as the captions: caption_column='caption')" if "caption" in clash else ""
        raise DataError(f"text_columns {clash} would take the name of another field; rename the column in "
                        f"{METADATA_FILE}{also}")
    return ((caption_column,) if caption_column is not None else ()) + text_columns


def load_folder(path: str, split: str = "train", resolution=None, caption_column: str | None = "text",
                fields=None, text_columns=(), grayscale=(), clips: bool = False,
                num_frames: int | None = None) -> ArrayDataset:
    """Load an image folder, a paired-image folder or a clip folder (layouts in the module
    docstring) into memory.

    path: the folder. split: "train" (the whole folder, or its train/ subfolder) or the name of
      a subfolder.
    resolution: None (each field's images must share one size), an int or (height, width) for
      every field, or a dict {field: int or (height, width)} (fields left out keep their size).
    caption_column: the metadata.jsonl key holding the caption ("text"); None: no captions.
    fields: None (a single-image folder), or the field names of a paired folder, e.g.
      ("source", "image"): one subfolder per field under the split root.
    text_columns: further metadata.jsonl keys to read as text fields, e.g. ("edit_prompt",).
    grayscale: fields to store as luma [..., H, W, 1] (Pillow's convert("L")), e.g. ("source",);
      "image" for a single-image folder, "frames" for clips.
    clips: True for a clip folder: each example is a subfolder of frames or a .npy/.npz file.
    num_frames: clips only: keep the first num_frames frames of every clip (default: all, and
      every clip must have the same number).
    Returns an ArrayDataset named "folder:<path>", no labels:
      single images: images uint8 [N, H, W, 3] (C = 1 if grayscale);
      paired: the field "image" as images uint8 [N, H, W, C], every other field as
        arrays[field] uint8 [N, H_f, W_f, C_f] (C_f = 1 for grayscale fields, else 3; sizes may
        differ between fields); images None when "image" is not one of the fields;
      clips: arrays["frames"] uint8 [N, F, H, W, C], images None;
      with metadata.jsonl: captions (list of N str; None if caption_column is None) and
      texts[column] (list of N str) for each of text_columns.
    Raises DataError naming the file, folder or field and the fix.
    """
    text_columns = _names("text_columns", text_columns)
    grayscale = _names("grayscale", grayscale)
    if not isinstance(clips, bool):
        raise DataError(f"clips must be True or False, got {clips!r}")
    if num_frames is not None and not clips:
        raise DataError("num_frames is an option of clip folders; pass clips=True (or drop num_frames)")
    if clips and fields is not None:
        raise DataError("clips=True reads one 'frames' field per example; it does not take fields= "
                        "(a paired folder of single images)")
    root = _split_root(path, split)
    name = f"folder:{path}"
    if clips:
        return _load_clips(root, name, split, resolution, caption_column, text_columns, grayscale, num_frames)
    if fields is not None:
        return _load_paired(root, name, split, _names("fields", fields), resolution, caption_column,
                            text_columns, grayscale)
    if set(grayscale) - {"image"}:
        raise DataError(f"grayscale={grayscale} names field(s) this folder does not have; a single-image folder "
                        "has the field 'image' (paired folders: pass fields=('source', 'image', ...))")
    columns = _check_columns(caption_column, text_columns, ("image",))
    target = field_resolutions(resolution, ("image",))["image"]
    files, metadata = _scan(root)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    rows = _read_metadata(metadata, columns) if metadata and columns else None
    keys = [os.path.normpath(f) for f in files]

    def missing_lines(missing):
        if not missing:
            return f"add {METADATA_FILE} beside the images with a line per image"
        return (f"{len(missing)} image(s) under {root} have no line in {METADATA_FILE}, e.g. "
                f"{missing[:5]}; add a caption for each or remove them")

    captions, texts = _texts_of(keys, rows, caption_column, text_columns, missing_lines)
    return ArrayDataset(images=_read_field_images(files, target, "image" in grayscale, None),
                        captions=captions, texts=texts, name=name, split=split)


def _stem_key(rel: str) -> str:
    """A relative path without its image extension ("sub/a.png" -> "sub/a")."""
    base, ext = os.path.splitext(rel)
    return base if ext.lower() in IMAGE_EXTENSIONS else rel


def _load_paired(root, name, split, fields, resolution, caption_column, text_columns, grayscale) -> ArrayDataset:
    for f in fields:
        if "/" in f or os.sep in f or f.startswith(".") or f in ("caption", "label"):
            raise DataError(f"fields: {f!r} cannot be a field folder name; use plain names such as "
                            "('source', 'image')")
    extra = sorted(set(grayscale) - set(fields))
    if extra:
        raise DataError(f"grayscale names {extra}, which are not among fields={fields}")
    columns = _check_columns(caption_column, text_columns, fields)
    targets = field_resolutions(resolution, fields)
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    by_field: dict[str, dict[str, str]] = {}
    for field in fields:
        folder = os.path.join(root, field)
        if not os.path.isdir(folder):
            raise DataError(f"paired folder {root} has no {field}/ subfolder for field {field!r} (it has "
                            f"{present or 'no subfolders'}); put each field's images in a subfolder named after "
                            "the field, with the same file names in every one")
        files, metadata = _scan(folder)
        if metadata:
            raise DataError(f"{metadata[0]} is inside the field folder {field}/; a paired folder keeps one "
                            f"{METADATA_FILE} at {root}, with file_name relative to the field folders")
        if not files:
            raise DataError(f"field folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        keyed: dict[str, str] = {}
        for f in files:
            key = _stem_key(_rel(f, folder))
            if key in keyed:
                raise DataError(f"{keyed[key]} and {f} are the same example (they differ only in extension); "
                                "keep one of them")
            keyed[key] = f
        by_field[field] = keyed
    keys = sorted(set().union(*(set(k) for k in by_field.values())))
    for key in keys:
        have = [f for f in fields if key in by_field[f]]
        lack = [f for f in fields if key not in by_field[f]]
        if lack:
            example = by_field[have[0]][key]
            raise DataError(f"{example} has no counterpart in {os.path.join(root, lack[0])}/ (field {lack[0]!r}: "
                            f"expected {lack[0]}/{key}.png or another image extension); every field folder needs "
                            "the same relative file names: add the missing file or remove this one")
    rows = None
    meta = os.path.join(root, METADATA_FILE)
    if columns and os.path.isfile(meta):
        rows = {}
        known = set(keys)
        for lineno, file_name, values in _metadata_rows(meta, columns):
            key = _stem_key(os.path.normpath(file_name).replace(os.sep, "/"))
            if key not in known:
                hint = ""
                head = key.split("/", 1)
                if len(head) == 2 and head[0] in fields and head[1] in known:
                    hint = f" (write {head[1]!r}: file_name is relative to the field folders, without '{head[0]}/')"
                raise DataError(f"{meta} line {lineno} names {file_name!r}, which is not an example of the field "
                                f"folders {list(fields)}{hint}; fix the file_name or remove the line")
            if key in rows:
                raise DataError(f"{meta} line {lineno}: {file_name!r} has a line already; keep one line per example")
            rows[key] = values

    def missing_lines(missing):
        if not missing:
            return f"add {meta} with a line per example"
        return (f"{len(missing)} example(s) have no line in {meta}, e.g. {missing[:5]} (file_name is relative "
                "to the field folders); add a line for each or remove them")

    captions, texts = _texts_of(keys, rows, caption_column, text_columns, missing_lines)
    loaded = {f: _read_field_images([by_field[f][k] for k in keys], targets[f], f in grayscale, f) for f in fields}
    return ArrayDataset(images=loaded.pop("image", None), arrays=loaded, captions=captions, texts=texts,
                        name=name, split=split)


# ----------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------

CLIP_LAYOUT = ("a subfolder of frame images, or a .npy of uint8 [F, H, W, C] (C = 1 or 3) or [F, H, W], "
               "or a .npz holding such an array under the key 'frames'")


def _natural_key(name: str):
    """Sort key comparing digit runs by value: 2.png before 10.png."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _to_luma(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> [..., H, W, 1] with Pillow's convert("L") (ITU-R 601-2 luma)."""
    from PIL import Image

    flat = frames.reshape((-1,) + frames.shape[-3:])
    out = np.stack([np.asarray(Image.fromarray(f).convert("L")) for f in flat])
    return out.reshape(frames.shape[:-1] + (1,))


def _read_clip_array(path: str) -> np.ndarray:
    """uint8 [F, H, W, C] from a .npy or .npz file, or a DataError naming it and the layout."""
    try:
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.keys())
                if "frames" in keys:
                    array = npz["frames"]
                elif len(keys) == 1:
                    array = npz[keys[0]]
                else:
                    raise DataError(f"clip {path} holds arrays {keys} but none named 'frames'; store the clip "
                                    "as np.savez(path, frames=uint8 [F, H, W, C])")
        else:
            array = np.load(path, allow_pickle=False)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"cannot read clip {path}: {type(e).__name__}: {e}; each clip is {CLIP_LAYOUT}") from e
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim not in (3, 4) or (
            array.ndim == 4 and array.shape[-1] not in (1, 3)):
        raise DataError(f"clip {path} is {getattr(array, 'dtype', type(array).__name__)} "
                        f"{list(getattr(array, 'shape', ()))}; each clip is {CLIP_LAYOUT} "
                        "(e.g. np.round(x * 255).astype(np.uint8) for floats in [0, 1])")
    if array.ndim == 3:
        array = array[..., None]  # [F, H, W] grey -> [F, H, W, 1]
    if array.shape[0] == 0:
        raise DataError(f"clip {path} has no frames; each clip is {CLIP_LAYOUT}")
    return array


def _read_clip_folder(folder: str, grey: bool, target) -> np.ndarray:
    """uint8 [F, H, W, C] from a folder of frame images sorted by name."""
    names = sorted((f for f in os.listdir(folder) if not f.startswith(".")
                    and f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))),
                   key=_natural_key)
    if not names:
        raise DataError(f"clip folder {folder} holds no frame images ({', '.join(IMAGE_EXTENSIONS)}); each clip is "
                        f"{CLIP_LAYOUT}")
    frames = []
    for f in names:
        img = read_image(os.path.join(folder, f), grayscale=grey)
        if target is not None:
            img = resize_center_crop(img, target)
        elif frames and img.shape != frames[0].shape:
            raise DataError(f"frame {os.path.join(folder, f)} is {img.shape[1]}x{img.shape[0]} (WxH) but "
                            f"{os.path.join(folder, names[0])} is {frames[0].shape[1]}x{frames[0].shape[0]}; all "
                            "frames must share one size, or pass resolution= to resize and center-crop them")
        frames.append(img)
    return np.stack(frames)


def _load_clips(root, name, split, resolution, caption_column, text_columns, grayscale, num_frames) -> ArrayDataset:
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer))
                                   or num_frames < 1):
        raise DataError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if set(grayscale) - {"frames"}:
        raise DataError(f"grayscale={grayscale}: a clip folder has the one field 'frames'; pass grayscale=('frames',)")
    grey = "frames" in grayscale
    columns = _check_columns(caption_column, text_columns, ("frames",))
    target = field_resolutions(resolution, ("frames",))["frames"]
    entries = []
    for entry in sorted(os.listdir(root)):
        full = os.path.join(root, entry)
        if entry.startswith(".") or entry == METADATA_FILE:
            continue
        if os.path.isdir(full):
            if os.path.isfile(os.path.join(full, METADATA_FILE)):
                raise DataError(f"{os.path.join(full, METADATA_FILE)} is inside a clip folder; a clip folder keeps "
                                f"one {METADATA_FILE} at {root}, with file_name = the clip's folder or file name")
            entries.append(entry)
        elif entry.lower().endswith((".npy", ".npz")):
            entries.append(entry)
        elif entry.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"clips=True but {full} is a single image directly under {root}; each clip is "
                            f"{CLIP_LAYOUT} (move the frames into a subfolder per clip)")
    if not entries:
        raise DataError(f"no clips found under {root}; each clip is {CLIP_LAYOUT}")
    clips, first = [], None
    for entry in entries:
        full = os.path.join(root, entry)
        if os.path.isdir(full):
            clip = _read_clip_folder(full, grey, target)
        else:
            clip = _read_clip_array(full)
            if grey and clip.shape[-1] == 3:
                clip = _to_luma(clip)
            if target is not None:
                clip = np.stack([resize_center_crop(f, target) for f in clip])
        if num_frames is not None:
            if clip.shape[0] < num_frames:
                raise DataError(f"clip {full} has {clip.shape[0]} frames, fewer than num_frames={num_frames}; "
                                "remove it or lower num_frames")
            clip = clip[:num_frames]
        if first is None:
            first = (full, clip.shape)
        elif clip.shape != first[1]:
            f0, (n0, h0, w0, c0) = first
            n, h, w, c = clip.shape
            if c != c0:
                fix = ("keep the channel count uniform (all RGB or all grey), or pass grayscale=('frames',) to "
                       "store every clip as luma [F, H, W, 1]")
            elif n != n0:
                fix = "pass num_frames=K to keep the first K frames of every clip"
            else:
                fix = "pass resolution= to resize and center-crop every frame"
            raise DataError(f"clip {full} is [F, H, W, C] = {list(clip.shape)} but {f0} is {list(first[1])}; all "
                            f"clips must share one shape: {fix}")
        clips.append(clip)
    rows = None
    meta = os.path.join(root, METADATA_FILE)
    if columns and os.path.isfile(meta):
        rows = {}
        stems: dict[str, list[str]] = {}
        for e in entries:
            stems.setdefault(os.path.splitext(e)[0] if not os.path.isdir(os.path.join(root, e)) else e, []).append(e)
        for lineno, file_name, values in _metadata_rows(meta, columns):
            key = file_name.rstrip("/")
            if key not in entries and len(stems.get(key, ())) == 1:
                key = stems[key][0]
            if key not in entries:
                raise DataError(f"{meta} line {lineno} names {file_name!r}, which is not a clip under {root} "
                                "(file_name is the clip's folder name or its .npy/.npz file name); fix the "
                                "file_name or remove the line")
            if key in rows:
                raise DataError(f"{meta} line {lineno}: {file_name!r} has a line already; keep one line per clip")
            rows[key] = values

    def missing_lines(missing):
        if not missing:
            return f"add {meta} with a line per clip"
        return (f"{len(missing)} clip(s) have no line in {meta}, e.g. {missing[:5]}; add a line for each "
                "(file_name = the clip's folder or file name) or remove them")

    captions, texts = _texts_of(entries, rows, caption_column, text_columns, missing_lines)
    return ArrayDataset(arrays={"frames": np.stack(clips)}, captions=captions, texts=texts, name=name, split=split)
