"""Image folders: ``load_dataset("folder:/path/to/images", split)``.

Layout (the convention of diffusers' training scripts and Hugging Face ``imagefolder``):

- image files ``*.png``, ``*.jpg``, ``*.jpeg``, ``*.webp`` (any case), found recursively; files and
  directories whose name starts with "." are ignored; examples are sorted by relative path;
- splits: when the folder has a subfolder named like the split (``train/``, ``test/``, ...) that
  subfolder is the split; otherwise the whole folder is the ``train`` split and other splits are
  an error (so is a folder with a ``test/`` but no ``train/`` subfolder, which would mix them);
- captions: optional ``metadata.jsonl`` files, one JSON object per line with ``file_name`` (relative
  to that metadata file's folder) and ``text`` (the caption column; ``caption_column=`` picks
  another key). When any metadata file exists, every image needs exactly one caption.

Images are decoded with Pillow and converted to RGB uint8: the EXIF orientation is applied;
grayscale, palette, CMYK and other 8-bit modes are converted with Pillow's ``convert("RGB")``;
images with an alpha channel (RGBA, LA, palette transparency) are composited over white; 16-bit
grayscale keeps its top 8 bits. Without ``resolution`` every image must have the size of the first
one; with ``resolution`` each image is resized (bilinear, antialiased) so it covers the target and
then center-cropped, as diffusers' ``Resize(resolution) + CenterCrop(resolution)``.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from jaxgen.data.dataset import ArrayDataset
from jaxgen.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
_SPLIT_DIRS = ("train", "test", "validation", "heldout")
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _resolution_hw(resolution) -> tuple[int, int]:
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

    th, tw = _resolution_hw(resolution)
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


def read_image(path: str) -> np.ndarray:
    """Decode one image file to RGB: uint8 [H, W, 3]. Raises DataError naming the file when it is
    unreadable, corrupt or in an unsupported mode (32-bit integer or float)."""
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
    rel = lambda p: os.path.relpath(p, root).replace(os.sep, "/")  # noqa: E731
    return sorted(images, key=rel), sorted(metadata, key=rel)


def _read_metadata(files: list[str], caption_column: str) -> dict[str, str]:
    """Absolute normalised image path -> caption, from metadata.jsonl files."""
    captions: dict[str, str] = {}
    for meta in files:
        base = os.path.dirname(meta)
        with open(meta, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{meta} line {lineno} is not valid JSON ({e}); each line must be an object "
                                    f'like {{"file_name": "a.png", "{caption_column}": "a caption"}}') from e
                if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
                    raise DataError(f"{meta} line {lineno} needs the keys 'file_name' and {caption_column!r}, "
                                    f"got {line.strip()[:200]}")
                text = row[caption_column]
                if not isinstance(text, str):
                    raise DataError(f"{meta} line {lineno}: {caption_column!r} must be a string, got {text!r}")
                path = os.path.normpath(os.path.join(base, row["file_name"]))
                if not os.path.isfile(path):
                    raise DataError(f"{meta} line {lineno} names {row['file_name']!r}, but {path} does not exist; "
                                    "fix the file_name or remove the line")
                if path in captions:
                    raise DataError(f"{meta} line {lineno}: {row['file_name']!r} has a caption already; "
                                    "keep one line per image")
                captions[path] = text
    return captions


def load_folder(path: str, split: str = "train", resolution=None, caption_column: str = "text") -> ArrayDataset:
    """Load an image folder (layout in the module docstring) into memory.

    path: the folder. split: "train" (the whole folder, or its train/ subfolder) or the name of
    a subfolder. resolution: None (all images must share one size), an int or (height, width).
    caption_column: the metadata.jsonl key holding the caption.
    Returns an ArrayDataset: images uint8 [N, H, W, 3], captions (list of N str) when metadata
    exists else None, no labels, name "folder:<path>".
    """
    if not os.path.isdir(path):
        raise DataError(f"image folder {path!r} does not exist or is not a directory; "
                        "use load_dataset('folder:/path/to/images', split)")
    root = os.path.join(path, split)
    if not os.path.isdir(root):
        if split != "train":
            raise DataError(f"image folder {path} has no {split!r} subfolder; without split subfolders the whole "
                            "folder is the 'train' split")
        present = [d for d in _SPLIT_DIRS if os.path.isdir(os.path.join(path, d))]
        if present:
            raise DataError(f"image folder {path} has split subfolders {present} but no 'train' subfolder; "
                            "move the training images into train/ so splits do not mix")
        root = path
    files, metadata = _scan(root)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    captions = _read_metadata(metadata, caption_column) if metadata else None
    if captions is not None:
        missing = [f for f in files if os.path.normpath(f) not in captions]
        if missing:
            raise DataError(f"{len(missing)} image(s) under {root} have no line in {METADATA_FILE}, e.g. "
                            f"{missing[:5]}; add a caption for each or remove them")
    target = None if resolution is None else _resolution_hw(resolution)
    arrays = []
    for f in files:
        img = read_image(f)  # [h, w, 3]
        if target is not None:
            img = resize_center_crop(img, target)
        elif arrays and img.shape != arrays[0].shape:
            raise DataError(f"image {f} is {img.shape[1]}x{img.shape[0]} (WxH) but {files[0]} is "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all images must share one size, "
                            "or pass resolution= to resize and center-crop them")
        arrays.append(img)
    return ArrayDataset(
        images=np.stack(arrays),
        captions=[captions[os.path.normpath(f)] for f in files] if captions is not None else None,
        name=f"folder:{path}",
        split=split,
    )
