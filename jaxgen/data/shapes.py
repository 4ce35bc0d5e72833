"""The embedded *shapes* dataset: drawing, captions, held-out combinations and the analyzer.

Every image is 32x32 RGB on black (0, 0, 0) with one filled shape, no rotation and no
anti-aliasing (DESIGN.md section 4):

- shape: ``circle``; ``square`` (axis aligned); ``triangle`` (upright: apex at the top, flat base
  at the bottom);
- color: six pure colours (``COLOR_RGB``);
- size: ``small`` = 9 px across, ``large`` = 16 px across (jitter -1, 0 or +1 px);
- position, the shape's centre (x, y): left (8, 16), right (24, 16), top (16, 8), bottom (16, 24),
  center (16, 16) (jitter -2..+2 px on each axis).

Geometry, exactly: a shape ``w`` px across occupies the ``w x w`` box whose top-left pixel is
``(cx - w // 2, cy - w // 2)``, so its centre is ``(cx, cy)`` for even ``w`` and half a pixel
right/below it for odd ``w``. When jitter would push the box over the canvas edge (large shapes at
the edge positions) the box is shifted back inside, so a shape is never clipped. Pixel ``(i, j)``
of the box (column ``i``, row ``j``, centre at ``(i + 0.5, j + 0.5)``) is filled when

- square: always;
- circle: its centre lies within ``w / 2`` of the box centre;
- triangle: ``|i + 0.5 - w / 2| <= (j + 1) / 2``, i.e. the half-width grows linearly from half a
  pixel in the top row to ``w / 2`` in the bottom row (1 or 2 apex pixels, a full-width base).

There are 3 x 6 x 2 x 5 = 180 attribute combinations, numbered by ``combination_index``. One
combination per (shape, color) pair, 18 in all (10 %), is held out (``HELDOUT_COMBINATIONS``):
it is never in the ``train`` or ``test`` splits and makes up the ``heldout`` split. The held-out
size is ``(shape + color) % 2`` and position ``(2 * shape + color) % 5`` (ids), so every value of
every attribute, and every pair of values of two attributes, still occurs in training.

``analyze`` reads the four attributes back from images and ``adherence`` scores images against
the attributes they were meant to show; both work on this dataset's images and on generated ones.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from jaxgen.errors import DataError

IMAGE_SIZE = 32  # images are [IMAGE_SIZE, IMAGE_SIZE, 3]

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
COLOR_RGB = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]],
    dtype=np.uint8,
)  # [6, 3] uint8, row k is COLORS[k]
SIZES = ("small", "large")
SIZE_PIXELS = (9, 16)  # width = height of the shape's box, per SIZES entry
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_CENTERS = ((8, 16), (24, 16), (16, 8), (16, 24), (16, 16))  # (x, y) per POSITIONS entry
PLACE_PHRASES = ("on the left", "on the right", "at the top", "at the bottom", "in the center")

SIZE_JITTER = 1  # the drawn width is SIZE_PIXELS[size] + dsize, |dsize| <= SIZE_JITTER
POSITION_JITTER = 2  # the centre moves by (dx, dy), |dx|, |dy| <= POSITION_JITTER

ATTRIBUTES = ("shape", "color", "size", "position")
ATTRIBUTE_NAMES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}
NUM_COMBINATIONS = len(SHAPES) * len(COLORS) * len(SIZES) * len(POSITIONS)  # 180

# Caption templates; fields {size} {color} {shape} {place}. The first one is the canonical
# caption stored in the dataset; the others are phrasings for caption augmentation.
CAPTION_TEMPLATES = (
    "a {size} {color} {shape} {place}",
    "{place}, a {size} {color} {shape}",
    "a {color} {shape}, {size}, {place}",
    "a {size} {shape} in {color} {place}",
    "a picture of a {size} {color} {shape} {place}",
    "{size} {color} {shape} {place} on a black background",
)

SPLITS = ("train", "test", "heldout")
# Default split sizes: 40 examples per training combination for train, 10 per combination for
# test and heldout. Examples cycle through the split's combinations, so any size stays balanced
# to within one example per combination.
DEFAULT_NUM_EXAMPLES = {"train": 40 * 162, "test": 10 * 162, "heldout": 10 * 18}


def _attribute_id(value, attribute: str) -> int:
    """Map an attribute name (e.g. "red") or id (e.g. 0) to its int id; DataError if unknown."""
    names = ATTRIBUTE_NAMES[attribute]
    if isinstance(value, str):
        if value not in names:
            raise DataError(f"unknown {attribute} {value!r}; use one of {names} (or their ids 0..{len(names) - 1})")
        return names.index(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{attribute} must be a name from {names} or an int id, got {value!r}")
    if not 0 <= int(value) < len(names):
        raise DataError(f"{attribute} id {value} is out of range; use 0..{len(names) - 1} for {names}")
    return int(value)


def combination_index(shape, color, size, position):
    """Number of an attribute combination, ``((shape * 6 + color) * 2 + size) * 5 + position``.

    Arguments are int ids (scalars or int arrays of one shape ``[...]``) or, for scalars, names.
    Returns an int (scalars) or an int32 array ``[...]`` in ``[0, 180)``.
    """
    if all(np.ndim(v) == 0 for v in (shape, color, size, position)):
        s, c, z, p = (_attribute_id(v, a) for v, a in zip((shape, color, size, position), ATTRIBUTES))
        return ((s * len(COLORS) + c) * len(SIZES) + z) * len(POSITIONS) + p
    s, c, z, p = (np.asarray(v, np.int32) for v in (shape, color, size, position))
    return (((s * len(COLORS) + c) * len(SIZES) + z) * len(POSITIONS) + p).astype(np.int32)


def combination_attributes(index) -> dict:
    """Inverse of ``combination_index``: index int or int array ``[...]`` in ``[0, 180)`` ->
    ``{"shape", "color", "size", "position"}`` ids (ints, or int32 arrays ``[...]``)."""
    idx = np.asarray(index)
    if np.any(idx < 0) or np.any(idx >= NUM_COMBINATIONS):
        raise DataError(f"combination index out of range [0, {NUM_COMBINATIONS}): {index!r}")
    rest, position = np.divmod(idx, len(POSITIONS))
    rest, size = np.divmod(rest, len(SIZES))
    shape, color = np.divmod(rest, len(COLORS))
    out = {"shape": shape, "color": color, "size": size, "position": position}
    if idx.ndim == 0:
        return {k: int(v) for k, v in out.items()}
    return {k: v.astype(np.int32) for k, v in out.items()}


def _heldout_combinations() -> tuple[int, ...]:
    held = []
    for s in range(len(SHAPES)):
        for c in range(len(COLORS)):
            held.append(combination_index(s, c, (s + c) % len(SIZES), (2 * s + c) % len(POSITIONS)))
    return tuple(sorted(held))


HELDOUT_COMBINATIONS = _heldout_combinations()  # 18 combination indices, sorted
TRAIN_COMBINATIONS = tuple(i for i in range(NUM_COMBINATIONS) if i not in set(HELDOUT_COMBINATIONS))  # 162


CLASS_NAMES = tuple(
    " ".join(ATTRIBUTE_NAMES[a][v] for a, v in combination_attributes(i).items()) for i in range(NUM_COMBINATIONS)
)  # label names in combination_index order: "circle red small left", ...


def split_combinations(split: str) -> tuple[int, ...]:
    """The combination indices a split draws from: train/test -> the 162 training ones,
    heldout -> the 18 held-out ones."""
    if split in ("train", "test"):
        return TRAIN_COMBINATIONS
    if split == "heldout":
        return HELDOUT_COMBINATIONS
    raise DataError(f"shapes has splits {SPLITS}, not {split!r}")


def caption(shape, color, size, position, template: int = 0) -> str:
    """Caption of one combination (names or ids); template 0 is the canonical
    "a {size} {color} {shape} {place}", e.g. "a large red circle on the left"."""
    s, c, z, p = (_attribute_id(v, a) for v, a in zip((shape, color, size, position), ATTRIBUTES))
    if not 0 <= template < len(CAPTION_TEMPLATES):
        raise DataError(f"caption template {template} out of range; there are {len(CAPTION_TEMPLATES)}")
    fields = {"size": SIZES[z], "color": COLORS[c], "shape": SHAPES[s], "place": PLACE_PHRASES[p]}
    return CAPTION_TEMPLATES[template].format(**fields)


def captions(shape, color, size, position) -> list[str]:
    """All phrasings of one combination (names or ids), canonical first (len(CAPTION_TEMPLATES))."""
    return [caption(shape, color, size, position, t) for t in range(len(CAPTION_TEMPLATES))]


def parse_caption(text: str) -> dict:
    """Attribute ids ``{"shape", "color", "size", "position"}`` (ints) of a canonical caption,
    e.g. "a large red circle on the left" -> {shape: 0, color: 0, size: 1, position: 0}."""
    words = text.strip().split(" ", 4)
    if len(words) == 5 and words[0] == "a":
        _, size, color, shape, place = words
        if size in SIZES and color in COLORS and shape in SHAPES and place in PLACE_PHRASES:
            return {"shape": SHAPES.index(shape), "color": COLORS.index(color),
                    "size": SIZES.index(size), "position": PLACE_PHRASES.index(place)}
    raise DataError(
        f"{text!r} is not a canonical shapes caption; expected 'a {{size}} {{color}} {{shape}} {{place}}' "
        f"with size in {SIZES}, color in {COLORS}, shape in {SHAPES}, place in {PLACE_PHRASES}"
    )


def _shape_mask(shape: int, width: int) -> np.ndarray:
    """Filled pixels of a shape in its box: bool [width, width] (rows, columns)."""
    c = np.arange(width) + 0.5 - width / 2  # pixel-centre offsets from the box centre
    if shape == 0:  # circle
        return c[:, None] ** 2 + c[None, :] ** 2 <= (width / 2) ** 2
    if shape == 1:  # square
        return np.ones((width, width), bool)
    half = (np.arange(width) + 1) / 2  # triangle half-width per row, top row first
    return np.abs(c)[None, :] <= half[:, None]


def draw_shape(shape, color, size, position, jitter=(0, 0, 0)) -> np.ndarray:
    """Draw one shapes image.

    shape, color, size, position: names (e.g. "circle", "red", "large", "left") or int ids.
    jitter: (dsize, dx, dy) ints, |dsize| <= 1, |dx|, |dy| <= 2: width change and centre shift in px.
    Returns uint8 [32, 32, 3]: black background, the shape in its pure colour (values 0 or 255).
    """
    s, c, z, p = (_attribute_id(v, a) for v, a in zip((shape, color, size, position), ATTRIBUTES))
    dsize, dx, dy = (int(j) for j in jitter)
    if abs(dsize) > SIZE_JITTER or abs(dx) > POSITION_JITTER or abs(dy) > POSITION_JITTER:
        raise DataError(
            f"jitter {tuple(jitter)} out of range; use (dsize, dx, dy) with |dsize| <= {SIZE_JITTER}, "
            f"|dx|, |dy| <= {POSITION_JITTER}"
        )
    width = SIZE_PIXELS[z] + dsize
    cx, cy = POSITION_CENTERS[p]
    # top-left corner of the box, shifted back inside the canvas if jitter pushed it over an edge
    x0 = min(max(cx + dx - width // 2, 0), IMAGE_SIZE - width)
    y0 = min(max(cy + dy - width // 2, 0), IMAGE_SIZE - width)
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    box = image[y0:y0 + width, x0:x0 + width]  # [width, width, 3] view
    box[_shape_mask(s, width)] = COLOR_RGB[c]
    return image


def example_jitter(seed: int, split: str, index: int) -> tuple[int, int, int]:
    """The (dsize, dx, dy) jitter of example ``index`` of ``split`` for ``seed``: a SHA-256 hash,
    so it is random access and independent of NumPy's random streams and versions."""
    digest = hashlib.sha256(f"jaxgen-shapes/{seed}/{split}/{index}".encode()).digest()
    v = int.from_bytes(digest[:8], "little")
    v, dsize = divmod(v, 2 * SIZE_JITTER + 1)
    v, dx = divmod(v, 2 * POSITION_JITTER + 1)
    dy = v % (2 * POSITION_JITTER + 1)
    return dsize - SIZE_JITTER, dx - POSITION_JITTER, dy - POSITION_JITTER


def generate_split(split: str, num_examples: int | None = None, seed: int = 0) -> dict:
    """Generate a split in memory (what the TFDS builder stores).

    Example ``j`` shows combination ``split_combinations(split)[j % n]`` with ``example_jitter``.
    num_examples: default ``DEFAULT_NUM_EXAMPLES[split]`` (train 6,480; test 1,620; heldout 180).
    Returns ``{"image": uint8 [N, 32, 32, 3], "label": int32 [N] combination index,
    "shape"/"color"/"size"/"position": int32 [N] ids, "jitter": int32 [N, 3],
    "caption": list of N canonical captions}``.
    """
    combos = split_combinations(split)
    n = DEFAULT_NUM_EXAMPLES[split] if num_examples is None else int(num_examples)
    if n < 0:
        raise DataError(f"num_examples must be >= 0, got {num_examples}")
    labels = np.asarray([combos[j % len(combos)] for j in range(n)], np.int32)
    attrs = combination_attributes(labels) if n else {a: np.zeros((0,), np.int32) for a in ATTRIBUTES}
    jitter = np.asarray([example_jitter(seed, split, j) for j in range(n)], np.int32).reshape(n, 3)
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    texts = []
    for j in range(n):
        args = [int(attrs[a][j]) for a in ATTRIBUTES]
        images[j] = draw_shape(*args, jitter=jitter[j])
        texts.append(caption(*args))
    return {"image": images, "label": labels, **attrs, "jitter": jitter, "caption": texts}


# ----------------------------------------------------------------------------------------------
# Analyzer
# ----------------------------------------------------------------------------------------------

_ON_THRESHOLD = 0.5  # a pixel belongs to the shape when its brightest channel exceeds this
_TRIANGLE_OFFSET = 0.045  # centroid below box centre / box height: 0 circle/square, ~0.14 triangle
_SQUARE_FILL = 0.88  # fraction of the box filled: ~0.78-0.85 circle, 1.0 square
_SIZE_SPLIT = 12.5  # box extent in px between small (8..10) and large (15..17)


def _check_images(images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DataError(f"analyze expects images [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not (np.nanmin(x) >= -1e-3 and np.nanmax(x) <= 1 + 1e-3):
            raise DataError(
                f"float images must be in [0, 1], got range [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]; "
                "map [-1, 1] model outputs with (x + 1) / 2 first"
            )
        return x.astype(np.float32, copy=False)
    raise DataError(f"analyze expects uint8 or float images, got dtype {x.dtype}")


def _largest_components(mask: np.ndarray) -> np.ndarray:
    """Keep each image's largest 8-connected component. mask: bool [N, H, W] -> bool [N, H, W]."""
    from scipy import ndimage

    n = mask.shape[0]
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # 8-connectivity inside an image, none across the batch axis
    labels, num = ndimage.label(mask, structure=structure)  # labels: int [N, H, W], 0 = background
    if num == 0:
        return mask
    counts = np.bincount(labels.ravel(), minlength=num + 1)  # [num + 1] pixels per component
    image_of = np.zeros(num + 1, np.int64)
    image_of[labels[mask]] = np.nonzero(mask)[0]  # the image each component lies in
    # per image, the label of its largest component: sort by (image, count), take the last
    order = np.lexsort((counts[1:], image_of[1:])) + 1
    last = np.ones(order.shape, bool)
    last[:-1] = image_of[order[1:]] != image_of[order[:-1]]
    best = np.zeros(n, labels.dtype)
    best[image_of[order[last]]] = order[last]
    return labels == best[:, None, None]


def analyze(images) -> dict:
    """Read shape, colour, size and position back from shapes-style images.

    images: uint8 [N, 32, 32, 3] or float [N, 32, 32, 3] in [0, 1].
    Method: pixels whose brightest channel exceeds 0.5 form the mask and its largest 8-connected
    component is the shape. Colour = nearest pure colour to the component's mean RGB (normalised
    by its largest channel). Shape = triangle when the component's centroid lies more than 4.5 %
    of the box height below its bounding-box centre (upright triangle: ~13-15 %; circle and
    square: 0), else square when it fills > 88 % of its box (circle: 78-85 %), else circle.
    Size = small when the box extent max(height, width) is < 12.5 px (small 8-10, large 15-17).
    Position = nearest place to the box centre (the box centre, not the centroid: a triangle's
    centroid sits 1/6 of its height below its box centre).
    Returns a dict of arrays:
      "shape", "color", "size", "position": int32 [N] ids into SHAPES, COLORS, SIZES, POSITIONS
        (-1 where no shape was found);
      "found": bool [N]; "fill": float32 [N] in [0, 1]; "vertical_offset": float32 [N] in
      [-0.5, 0.5]; "extent": int32 [N] px; "center": float32 [N, 2] (x, y) px (NaN if not found);
      "rgb": float32 [N, 3] mean colour in [0, 1].
    """
    x = _check_images(images)  # [N, H, W, 3] uint8, or float32 in [0, 1]
    n, h, w, _ = x.shape
    bright = np.maximum(np.maximum(x[..., 0], x[..., 1]), x[..., 2])  # [N, H, W]
    scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    mask = _largest_components(bright * scale > _ON_THRESHOLD)  # bool [N, H, W]
    area = mask.sum((1, 2))  # [N]
    found = area > 0
    safe_area = np.maximum(area, 1)
    rows, cols = mask.any(2), mask.any(1)  # [N, H], [N, W]
    y0, y1 = rows.argmax(1), h - 1 - rows[:, ::-1].argmax(1)  # first/last occupied row
    x0, x1 = cols.argmax(1), w - 1 - cols[:, ::-1].argmax(1)
    box_h, box_w = (y1 - y0 + 1) * found, (x1 - x0 + 1) * found
    fill = area / np.maximum(box_h * box_w, 1)
    centroid_y = (mask.sum(2) * (np.arange(h) + 0.5)).sum(1) / safe_area  # mean pixel-centre row
    vertical_offset = (centroid_y - (y0 + y1 + 1) / 2) / np.maximum(box_h, 1)
    maskf = mask.astype(np.float32)
    rgb = np.einsum("nhwc,nhw->nc", x, maskf, dtype=np.float32) * scale / safe_area[:, None]  # [N, 3]
    hue = rgb / np.maximum(rgb.max(1, keepdims=True), 1e-6)  # brightest channel -> 1
    palette = COLOR_RGB.astype(np.float32) / 255.0  # [6, 3]
    color = np.argmin(((hue[:, None, :] - palette[None]) ** 2).sum(-1), 1)
    shape = np.where(vertical_offset > _TRIANGLE_OFFSET, 2, np.where(fill > _SQUARE_FILL, 1, 0))
    extent = np.maximum(box_h, box_w)
    size = (extent > _SIZE_SPLIT).astype(np.int64)
    center = np.stack([(x0 + x1 + 1) / 2.0, (y0 + y1 + 1) / 2.0], -1)  # [N, 2] (x, y)
    places = np.asarray(POSITION_CENTERS, np.float32)  # [5, 2]
    position = np.argmin(((center[:, None, :] - places[None]) ** 2).sum(-1), 1)
    missing = np.int32(-1)
    return {
        "shape": np.where(found, shape, missing).astype(np.int32),
        "color": np.where(found, color, missing).astype(np.int32),
        "size": np.where(found, size, missing).astype(np.int32),
        "position": np.where(found, position, missing).astype(np.int32),
        "found": found,
        "fill": fill.astype(np.float32),
        "vertical_offset": vertical_offset.astype(np.float32),
        "extent": extent.astype(np.int32),
        "center": np.where(found[:, None], center, np.nan).astype(np.float32),
        "rgb": rgb.astype(np.float32),
    }


def adherence(images, attributes: Mapping[str, Sequence[int]]) -> dict:
    """Fraction of images whose analysed attributes match the intended ones.

    images: uint8 [N, 32, 32, 3] or float [N, 32, 32, 3] in [0, 1].
    attributes: any of "shape", "color", "size", "position" -> int ids [N] (other keys, e.g.
      "jitter", are ignored), e.g. ``ArrayDataset.attributes`` or ``parse_caption`` results stacked.
    Returns {attribute: accuracy in [0, 1]} for each given attribute, plus "all": the fraction of
    images with every given attribute right (floats). An image with no shape counts as wrong.
    """
    keys = [a for a in ATTRIBUTES if a in attributes]
    if not keys:
        raise DataError(f"adherence needs at least one of {ATTRIBUTES} in attributes, got keys {sorted(attributes)}")
    read = analyze(images)
    n = read["shape"].shape[0]
    correct = []
    for a in keys:
        target = np.asarray(attributes[a])
        if target.shape != (n,):
            raise DataError(f"attributes[{a!r}] must be int ids [N={n}], got shape {target.shape}")
        correct.append(read[a] == target)
    correct = np.stack(correct)  # [num_keys, N]
    out = {a: float(c.mean()) if n else float("nan") for a, c in zip(keys, correct)}
    out["all"] = float(correct.all(0).mean()) if n else float("nan")
    return out
