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


def partial_caption(shape, color, size, position, keep) -> str:
    """The canonical caption naming only the attributes in ``keep`` (a non-empty collection of
    ATTRIBUTES), the others left out; without the shape the noun is "shape":
    keep=("shape",) -> "a circle", ("color",) -> "a red shape", ("size", "position") ->
    "a small shape on the left". All four give the canonical caption."""
    keep = set(keep)
    if not keep or not keep <= set(ATTRIBUTES):
        raise DataError(f"partial_caption: keep={sorted(keep)} must be a non-empty subset of {ATTRIBUTES}")
    s, c, z, p = (_attribute_id(v, a) for v, a in zip((shape, color, size, position), ATTRIBUTES))
    words = ["a"]
    if "size" in keep:
        words.append(SIZES[z])
    if "color" in keep:
        words.append(COLORS[c])
    words.append(SHAPES[s] if "shape" in keep else "shape")
    if "position" in keep:
        words.append(PLACE_PHRASES[p])
    return " ".join(words)


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


# Shapes the dataset never draws (a LoRA teaches one to a finished model): name -> mask of its box.
EXTRA_SHAPES = ("cross",)
_CROSS_FILL = 0.7  # an upright plus sign fills ~0.56-0.62 of its box; circles 0.78-0.85


def _extra_mask(name: str, width: int) -> np.ndarray:
    if name == "cross":   # a plus sign, arms a third of the box wide
        arm = max(1, round(width / 3))
        lo = (width - arm) // 2
        band = (np.arange(width) >= lo) & (np.arange(width) < lo + arm)
        return band[:, None] | band[None, :]
    raise DataError(f"extra shape {name!r}: use one of {EXTRA_SHAPES}.")


def draw_extra_shape(name: str, color, size, position, jitter=(0, 0, 0)) -> np.ndarray:
    """Draw a shape outside the dataset's three (``EXTRA_SHAPES``, e.g. "cross") with the
    dataset's colours, sizes, places and jitter rules: uint8 [32, 32, 3]."""
    image = draw_shape("square", color, size, position, jitter)
    on = image.max(-1) > 0                                   # the square's box
    ys, xs = np.nonzero(on)
    y0, x0, width = ys.min(), xs.min(), ys.max() - ys.min() + 1
    rgb = image[y0, x0].copy()
    image[:] = 0
    box = image[y0:y0 + width, x0:x0 + width]
    box[_extra_mask(name, width)] = rgb
    return image


def is_cross(images) -> np.ndarray:
    """bool [N]: the analyzer's largest shape is an upright cross (no triangle offset, and it fills
    less than 70% of its box, where circles fill 78-85% and squares all of it)."""
    read = analyze(images)
    return read["found"] & (read["vertical_offset"] <= _TRIANGLE_OFFSET) & (read["fill"] < _CROSS_FILL)


def extra_shape_examples(name: str, num: int, seed: int) -> dict:
    """``num`` images of extra shape ``name`` cycling through every colour x size x position (60),
    with hashed jitter: {"image": uint8 [num, 32, 32, 3], "caption": canonical captions with the
    shape's word ("a large red cross on the left"), "color", "size", "position": int32 [num]}."""
    if name not in EXTRA_SHAPES:
        raise DataError(f"extra shape {name!r}: use one of {EXTRA_SHAPES}.")
    combos = [(c, z, p) for c in range(len(COLORS)) for z in range(len(SIZES)) for p in range(len(POSITIONS))]
    rows = [combos[j % len(combos)] for j in range(num)]
    images = np.stack([draw_extra_shape(name, c, z, p, example_jitter(seed, f"extra-{name}", j))
                       for j, (c, z, p) in enumerate(rows)]) if num else np.zeros((0, 32, 32, 3), np.uint8)
    captions = [f"a {SIZES[z]} {COLORS[c]} {name} {PLACE_PHRASES[p]}" for c, z, p in rows]
    cols = np.asarray(rows, np.int32).reshape(-1, 3)
    return {"image": images, "caption": captions, "color": cols[:, 0], "size": cols[:, 1], "position": cols[:, 2]}


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


def shape_masks(images) -> np.ndarray:
    """The shapes' masks, white on black: uint8 [N, H, W, 1], 255 where a pixel of the uint8
    images [N, H, W, 3] is not black (shapes images are one pure colour on black), else 0."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"shape_masks takes uint8 images [N, H, W, C], got {images.dtype} {images.shape}.")
    return np.where(images.max(-1, keepdims=True) > 0, 255, 0).astype(np.uint8)


# Instruction phrasings of an edit that changes one attribute, per kind; {value} is the new
# value's word (a colour, a shape, a place word, small/large). The first is the canonical one.
EDIT_KINDS = ("color", "shape", "position", "size")
EDIT_TEMPLATES = {
    "color": ("make it {value}", "change the color to {value}", "paint it {value}", "turn it {value}"),
    "shape": ("turn it into a {value}", "make it a {value}", "change it to a {value}", "replace it with a {value}"),
    "position": ("move it to the {value}", "put it at the {value}", "place it on the {value}",
                 "shift it to the {value}"),
    "size": ("make it {value}", "make the shape {value}", "resize it to {value}", "change it to {value}"),
}
POSITION_WORDS = ("left", "right", "top", "bottom", "center")     # per POSITIONS entry


def edit_instruction(kind: str, value: int, template: int = 0) -> str:
    """The instruction that sets attribute ``kind`` to ``value`` (an id), e.g. ("color", 2) ->
    "make it blue", ("position", 0) -> "move it to the left"."""
    if kind not in EDIT_TEMPLATES:
        raise DataError(f"edit kind {kind!r}: use one of {EDIT_KINDS}.")
    words = POSITION_WORDS if kind == "position" else ATTRIBUTE_NAMES[kind]
    templates = EDIT_TEMPLATES[kind]
    return templates[template % len(templates)].format(value=words[int(value)])


def _edit_draw(seed: int, split: str, index: int) -> tuple[int, int, int]:
    """(kind, new-value offset in [1, K), template) of edit example ``index``: a SHA-256 hash."""
    digest = hashlib.sha256(f"jaxgen-shapes-edit/{seed}/{split}/{index}".encode()).digest()
    v = int.from_bytes(digest[:8], "little")
    v, kind = divmod(v, len(EDIT_KINDS))
    v, offset = divmod(v, 1 << 16)
    return kind, offset, v % 4


def edit_triplets(source: Mapping[str, np.ndarray], seed: int, split: str, canonical: bool = False) -> dict:
    """(input image, instruction, edited image) triplets from shapes examples.

    source: {"shape", "color", "size", "position": int [N] ids, "jitter": int [N, 3]} (a split of
    ``generate_split``). Example j changes one attribute (kind and new value drawn by a hash of
    (seed, split, j); every kind equally often in expectation) and keeps the jitter, so only the
    asked attribute differs. canonical: use each kind's first phrasing only.
    Returns {"source": uint8 [N, 32, 32, 3], "image": uint8 [N, 32, 32, 3] (edited), "instruction":
    list of N str, "caption": list of N canonical captions of the edited images, "kind": int32
    [N] index into EDIT_KINDS, "target": {attribute: int32 [N]} the edited image's attributes}.
    """
    attrs = {a: np.asarray(source[a], np.int32) for a in ATTRIBUTES}
    jitter = np.asarray(source["jitter"], np.int32)
    n = len(jitter)
    target = {a: v.copy() for a, v in attrs.items()}
    kinds = np.zeros(n, np.int32)
    instructions, captions = [], []
    src = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    out = np.zeros_like(src)
    for j in range(n):
        kind, offset, template = _edit_draw(seed, split, j)
        name = EDIT_KINDS[kind]
        k = len(ATTRIBUTE_NAMES[name])
        new = (int(attrs[name][j]) + 1 + offset % (k - 1)) % k
        target[name][j] = new
        kinds[j] = kind
        instructions.append(edit_instruction(name, new, 0 if canonical else template))
        before = [int(attrs[a][j]) for a in ATTRIBUTES]
        after = [int(target[a][j]) for a in ATTRIBUTES]
        src[j] = draw_shape(*before, jitter=jitter[j])
        out[j] = draw_shape(*after, jitter=jitter[j])
        captions.append(caption(*after))
    return {"source": src, "image": out, "instruction": instructions, "caption": captions, "kind": kinds,
            "target": target}


def grid_patterns(num: int, seed: int, cells: int = 4, colors=None) -> dict:
    """Random binary grid patterns (the ControlNet "QR code" exercise): a cells x cells grid of
    (32 / cells)-pixel squares, each on with probability 1/2, drawn in one pure colour on black.

    colors: int [num] colour ids (default: drawn from ``seed`` too). Returns {"image": uint8
    [num, 32, 32, 3], "mask": uint8 [num, 32, 32, 1] (255 on), "grid": bool [num, cells, cells],
    "color": int32 [num]} from numpy's default_rng(seed).
    """
    if cells < 1 or IMAGE_SIZE % cells:
        raise DataError(f"cells={cells} must divide the image size {IMAGE_SIZE}.")
    rng = np.random.default_rng(seed)
    grid = rng.random((num, cells, cells)) < 0.5
    color = (rng.integers(0, len(COLORS), num) if colors is None else np.asarray(colors)).astype(np.int32)
    if color.shape != (num,) or color.min(initial=0) < 0 or color.max(initial=0) >= len(COLORS):
        raise DataError(f"colors must be {num} ids in [0, {len(COLORS) - 1}].")
    px = IMAGE_SIZE // cells
    on = np.repeat(np.repeat(grid, px, axis=1), px, axis=2)                  # [num, 32, 32]
    image = np.where(on[..., None], COLOR_RGB[color][:, None, None, :], 0).astype(np.uint8)
    return {"image": image, "mask": np.where(on, 255, 0).astype(np.uint8)[..., None], "grid": grid,
            "color": color}


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
_SQUARE_FILL = 0.88  # fraction of the box filled: discs ~0.6-0.94 (large <= 0.88), squares 1.0
# a square even with its 4 corner pixels cut (blur, coverage rasterisers): 8x8 less its corners
# fills 0.9375, which a coverage-rasterised ~9 px disc also is (ambiguous, read as square); other discs <= 0.922
_SQUARE_SURE_FILL = 0.93
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
    square: 0), else square when it fills > 88 % of its box (discs: large <= 88 %, small 60-94 %)
    and, if small, a corner pixel of its box is on (a rasterised disc never reaches its box's
    corners) or it fills > 93 % (a square whose corner pixels blur or a rasteriser cut), else circle.
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
    i = np.arange(n)
    corner = mask[i, y0, x0] | mask[i, y0, x1] | mask[i, y1, x0] | mask[i, y1, x1]  # [N] a box corner is on
    extent = np.maximum(box_h, box_w)
    square = (fill > _SQUARE_FILL) & (corner | (fill > _SQUARE_SURE_FILL) | (extent > _SIZE_SPLIT))
    shape = np.where(vertical_offset > _TRIANGLE_OFFSET, 2, np.where(square, 1, 0))
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


# ----------------------------------------------------------------------------------------------
# Moving shapes: clips for text-to-video
# ----------------------------------------------------------------------------------------------

DIRECTIONS = ("left", "right", "up", "down", "still")
DIRECTION_STEPS = ((-1, 0), (1, 0), (0, -1), (0, 1), (0, 0))  # (dx, dy) per frame and px of speed; y grows down
MAX_SPEED = 2  # px per frame of a moving shape (less when the clip is too long to fit, see clip_speed)
CLIP_ATTRIBUTES = ("shape", "color", "size", "direction")
NUM_CLIP_COMBINATIONS = len(SHAPES) * len(COLORS) * len(SIZES) * len(DIRECTIONS)  # 180


def motion_phrase(direction) -> str:
    """"moving left" / "moving right" / "moving up" / "moving down" / "standing still"."""
    d = _direction_id(direction)
    return "standing still" if DIRECTIONS[d] == "still" else f"moving {DIRECTIONS[d]}"


def _direction_id(value) -> int:
    if isinstance(value, str):
        if value not in DIRECTIONS:
            raise DataError(f"unknown direction {value!r}; use one of {DIRECTIONS} (or their ids 0..4)")
        return DIRECTIONS.index(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value < 5:
        raise DataError(f"direction must be a name from {DIRECTIONS} or an id 0..4, got {value!r}")
    return int(value)


def motion_caption(shape, color, direction, size=None) -> str:
    """Caption of a moving-shape clip (names or ids): "a red circle moving right", with a size
    "a small blue square moving up", still: "a green triangle standing still"."""
    s, c = _attribute_id(shape, "shape"), _attribute_id(color, "color")
    words = [SIZES[_attribute_id(size, "size")]] if size is not None else []
    return " ".join(["a", *words, COLORS[c], SHAPES[s], motion_phrase(direction)])


def clip_speed(num_frames: int) -> int:
    """Pixels per frame a shape moves in clips of ``num_frames`` frames: MAX_SPEED, or less so the
    widest shape (17 px) crosses the canvas inside it; DataError when not even 1 px fits."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 2:
        raise DataError(f"num_frames={num_frames!r}: a moving-shapes clip has at least 2 frames.")
    room = IMAGE_SIZE - (SIZE_PIXELS[-1] + SIZE_JITTER)
    speed = min(MAX_SPEED, room // (int(num_frames) - 1))
    if speed < 1:
        raise DataError(f"num_frames={num_frames}: a large shape cannot move 1 px per frame for that long inside "
                        f"{IMAGE_SIZE} px; use at most {room + 1} frames.")
    return speed


def draw_shape_at(shape, color, width: int, x0: int, y0: int) -> np.ndarray:
    """Draw one shape (names or ids) in the ``width`` x ``width`` box whose top-left pixel is
    (x0, y0), with draw_shape's rasterisation: uint8 [32, 32, 3]. The box must lie inside."""
    s, c = _attribute_id(shape, "shape"), _attribute_id(color, "color")
    width, x0, y0 = int(width), int(x0), int(y0)
    if width < 1 or not (0 <= x0 <= IMAGE_SIZE - width and 0 <= y0 <= IMAGE_SIZE - width):
        raise DataError(f"a {width} px box at ({x0}, {y0}) does not fit inside the {IMAGE_SIZE}x{IMAGE_SIZE} canvas.")
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[y0:y0 + width, x0:x0 + width][_shape_mask(s, width)] = COLOR_RGB[c]
    return image


def moving_clips(num: int, seed: int, num_frames: int = 8, split: str = "train") -> dict:
    """``num`` clips of one shape moving across the black canvas (text-to-video data).

    Clip j shows combination j % 180 of (shape, color, size, direction) in that nesting order
    (every combination equally often), with DIRECTIONS left, right, up, down (clip_speed px per
    frame, 2 for up to 8 frames) or still. Its width (size +-1 px), start (so the whole path
    stays inside the canvas) and whether its caption names the size (half of them) are drawn from
    numpy's default_rng([seed, split index]): ``split`` ("train", "test") picks an independent
    stream. Shapes are rasterised as ``draw_shape`` (``draw_shape_at``).
    Returns {"frames": uint8 [num, F, 32, 32, 3], "caption": num str ("a red circle moving right",
    "a small blue square moving up", "a green triangle standing still"), "shape", "color",
    "size", "direction": int32 [num] ids, "center": float32 [num, F, 2] (x, y) box centres}.
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise DataError(f"num={num!r}: ask for a number of clips >= 0.")
    if split not in SPLITS:
        raise DataError(f"split {split!r}: use one of {SPLITS}.")
    speed = clip_speed(num_frames)
    f = int(num_frames)
    rng = np.random.default_rng([int(seed), SPLITS.index(split)])
    combos = np.arange(num) % NUM_CLIP_COMBINATIONS
    shape, color, size, direction = (a.astype(np.int32) for a in np.unravel_index(
        combos, (len(SHAPES), len(COLORS), len(SIZES), len(DIRECTIONS))))
    frames = np.zeros((num, f, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    center = np.zeros((num, f, 2), np.float32)
    captions = []
    for j in range(num):
        width = SIZE_PIXELS[size[j]] + int(rng.integers(-SIZE_JITTER, SIZE_JITTER + 1))
        step = np.asarray(DIRECTION_STEPS[direction[j]]) * speed           # (dx, dy) px per frame
        travel = step * (f - 1)
        low = np.maximum(0, -travel)                                        # start range per axis
        high = IMAGE_SIZE - width - np.maximum(0, travel)
        start = np.asarray([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])
        for k in range(f):
            x0, y0 = start + k * step
            frames[j, k] = draw_shape_at(shape[j], color[j], width, x0, y0)
            center[j, k] = (x0 + width / 2, y0 + width / 2)
        sized = bool(rng.integers(0, 2))
        captions.append(motion_caption(shape[j], color[j], direction[j], size[j] if sized else None))
    return {"frames": frames, "caption": captions, "shape": shape, "color": color, "size": size,
            "direction": direction, "center": center}


def motion_direction(first, last, min_shift: float) -> np.ndarray:
    """Direction ids (DIRECTIONS) of the move from centre ``first`` to ``last`` (float [N, 2]
    (x, y) px): "still" when neither coordinate changed by ``min_shift`` px or more, else the
    axis that changed most and its sign (y grows downwards: up is negative). -1 where a centre is
    NaN (no shape found). Returns int32 [N]."""
    first, last = np.asarray(first, np.float64), np.asarray(last, np.float64)
    d = last - first                                                        # [N, 2]
    horizontal = np.abs(d[:, 0]) >= np.abs(d[:, 1])
    moving = np.abs(d).max(-1, initial=0.0) >= min_shift
    way = np.where(horizontal, np.where(d[:, 0] > 0, 1, 0), np.where(d[:, 1] > 0, 3, 2))
    out = np.where(moving, way, DIRECTIONS.index("still"))
    return np.where(np.isnan(d).any(-1), -1, out).astype(np.int32)


def analyze_clips(frames, min_shift: float | None = None) -> dict:
    """``analyze`` on every frame of clips, and each clip's motion.

    frames: uint8 [N, F, 32, 32, 3] or float in [0, 1], F >= 2. min_shift: the displacement (px)
    of the box centre from the first to the last frame that counts as a move (default: half the
    path a training clip of F frames travels, clip_speed(F) * (F - 1) / 2).
    Returns analyze's per-frame arrays as [N, F, ...] ("shape", "color", "size", "found",
    "center", ...), plus "direction": int32 [N] (motion_direction of the first and last frames'
    box centres; -1 if either has no shape) and "consistent": bool [N] (a shape found on every
    frame, with the same shape and colour on all frames).
    """
    x = np.asarray(frames)
    if x.ndim != 5 or x.shape[1] < 2:
        raise DataError(f"analyze_clips expects clips [N, F >= 2, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got shape {x.shape}")
    n, f = x.shape[:2]
    read = analyze(x.reshape((n * f,) + x.shape[2:]))
    out = {k: v.reshape((n, f) + v.shape[1:]) for k, v in read.items()}
    shift = clip_speed(f) * (f - 1) / 2 if min_shift is None else float(min_shift)
    out["direction"] = motion_direction(out["center"][:, 0], out["center"][:, -1], shift)
    same = lambda a: (out[a] == out[a][:, :1]).all(1)                     # noqa: E731
    out["consistent"] = out["found"].all(1) & same("shape") & same("color")
    return out
