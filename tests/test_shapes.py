"""Shapes drawing, captions, held-out combinations and the analyzer (pure NumPy, no TFDS)."""
import itertools

import numpy as np
import pytest

from jaxgen.data import shapes as S
from jaxgen.errors import DataError

JITTERS = list(itertools.product((-1, 0, 1), (-2, 0, 2), (-2, 0, 2)))


@pytest.fixture(scope="module")
def every_combination():
    """All 180 combinations x 27 jitters: images uint8 [4860, 32, 32, 3] and their attributes."""
    images, attrs = [], {a: [] for a in S.ATTRIBUTES}
    for idx in range(S.NUM_COMBINATIONS):
        a = S.combination_attributes(idx)
        for j in JITTERS:
            images.append(S.draw_shape(a["shape"], a["color"], a["size"], a["position"], j))
            for k in S.ATTRIBUTES:
                attrs[k].append(a[k])
    return np.stack(images), {k: np.asarray(v, np.int32) for k, v in attrs.items()}


def _box(image):
    ys, xs = np.nonzero(image.max(-1))
    return xs.min(), xs.max(), ys.min(), ys.max()


def test_draw_geometry_and_colors():
    img = S.draw_shape("square", "red", "large", "center")
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert _box(img) == (8, 23, 8, 23)  # 16 px box centred at (16, 16)
    assert set(map(tuple, img.reshape(-1, 3))) == {(0, 0, 0), (255, 0, 0)}
    small = S.draw_shape("square", "cyan", "small", "top")
    assert _box(small) == (12, 20, 4, 12)  # 9 px box, top-left (16 - 4, 8 - 4)
    assert tuple(small[8, 16]) == (0, 255, 255)
    shifted = S.draw_shape("square", "red", "small", "center", jitter=(1, 2, -2))
    assert _box(shifted) == (13, 22, 9, 18)  # 10 px box at (16 + 2 - 5, 16 - 2 - 5)
    # a large shape at the edge is shifted back inside the canvas, never clipped
    edge = S.draw_shape("square", "blue", "large", "left", jitter=(1, -2, 0))
    assert _box(edge)[0] == 0 and (edge.max(-1) > 0).sum() == 17 * 17
    for k, name in enumerate(S.COLORS):
        assert tuple(S.draw_shape("circle", name, 1, 4).max((0, 1))) == tuple(S.COLOR_RGB[k])


def test_triangle_is_upright_and_circle_round():
    tri = S.draw_shape("triangle", "green", "large", "center").max(-1) > 0
    widths = tri.sum(1)[8:24]  # row widths, top to bottom
    assert widths[0] in (1, 2) and widths[-1] == 16 and np.all(np.diff(widths) >= 0)
    circ = S.draw_shape("circle", "green", "large", "center").max(-1) > 0
    assert abs(circ.sum() / 256 - np.pi / 4) < 0.03
    assert np.array_equal(circ, circ[::-1]) and np.array_equal(circ, circ[:, ::-1])


def test_draw_rejects_bad_arguments():
    with pytest.raises(DataError, match="unknown color 'purple'"):
        S.draw_shape("circle", "purple", "small", "left")
    with pytest.raises(DataError, match="jitter"):
        S.draw_shape("circle", "red", "small", "left", jitter=(0, 3, 0))
    with pytest.raises(DataError, match="out of range"):
        S.draw_shape(3, "red", "small", "left")


def test_captions_and_combinations():
    assert S.caption("circle", "red", "large", "left") == "a large red circle on the left"
    assert S.caption(2, 5, 0, 4) == "a small cyan triangle in the center"
    variants = S.captions("square", "blue", "small", "top")
    assert variants[0] == "a small blue square at the top" and len(set(variants)) == len(S.CAPTION_TEMPLATES)
    for text in variants:
        assert all(w in text for w in ("small", "blue", "square", "top"))
    assert S.parse_caption("a large red circle on the left") == {"shape": 0, "color": 0, "size": 1, "position": 0}
    with pytest.raises(DataError, match="not a canonical shapes caption"):
        S.parse_caption("a red circle")
    idx = np.arange(S.NUM_COMBINATIONS)
    back = S.combination_attributes(idx)
    assert np.array_equal(S.combination_index(back["shape"], back["color"], back["size"], back["position"]), idx)
    assert S.combination_index("triangle", "cyan", "large", "center") == 179


def test_heldout_combinations_keep_every_pair_in_training():
    held, train = set(S.HELDOUT_COMBINATIONS), set(S.TRAIN_COMBINATIONS)
    assert len(held) == 18 and len(train) == 162 and not held & train
    train_attrs = S.combination_attributes(np.asarray(sorted(train)))
    for a, b in itertools.combinations(S.ATTRIBUTES, 2):
        pairs = set(zip(train_attrs[a], train_attrs[b]))
        assert len(pairs) == len(S.ATTRIBUTE_NAMES[a]) * len(S.ATTRIBUTE_NAMES[b]), (a, b)


def test_generate_split_is_deterministic_and_balanced():
    a = S.generate_split("train", 324, seed=0)
    b = S.generate_split("train", 324, seed=0)
    c = S.generate_split("train", 324, seed=1)
    assert np.array_equal(a["image"], b["image"]) and not np.array_equal(a["image"], c["image"])
    assert np.bincount(a["label"], minlength=180)[list(S.TRAIN_COMBINATIONS)].tolist() == [2] * 162
    held = S.generate_split("heldout", 36)
    assert set(held["label"].tolist()) == set(S.HELDOUT_COMBINATIONS)
    j = 7
    redraw = S.draw_shape(*(int(a[k][j]) for k in S.ATTRIBUTES), jitter=a["jitter"][j])
    assert np.array_equal(redraw, a["image"][j])
    assert a["caption"][j] == S.caption(*(int(a[k][j]) for k in S.ATTRIBUTES))
    assert np.abs(a["jitter"]).max(0).tolist() == [1, 2, 2]


def test_analyzer_reads_every_combination(every_combination):
    images, attrs = every_combination
    result = S.adherence(images, attrs)
    assert all(result[a] >= 0.99 for a in S.ATTRIBUTES + ("all",)), result
    read = S.analyze(images.astype(np.float32) / 255.0)  # float input in [0, 1]
    assert np.array_equal(read["shape"], attrs["shape"])
    assert read["rgb"].shape == (len(images), 3) and read["center"].shape == (len(images), 2)


def _box_blur(x):
    """3x3 box blur with zero padding. x: float [N, H, W, C]."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(p[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3) for j in range(3)) / 9.0


@pytest.mark.parametrize("corruption", ["noise", "blur", "blur+noise"])
def test_analyzer_is_robust(every_combination, corruption):
    images, attrs = every_combination
    x = images.astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    if "blur" in corruption:
        x = _box_blur(x)
    if "noise" in corruption:
        x = np.clip(x + rng.normal(0.0, 10 / 255, x.shape), 0.0, 1.0).astype(np.float32)
    result = S.adherence(x, attrs)
    assert all(result[a] >= 0.95 for a in S.ATTRIBUTES), result


def test_analyzer_edge_cases():
    blank = np.zeros((2, 32, 32, 3), np.uint8)
    read = S.analyze(blank)
    assert not read["found"].any() and (read["shape"] == -1).all()
    assert S.adherence(blank, {"color": np.zeros(2, np.int32)}) == {"color": 0.0, "all": 0.0}
    # a stray bright pixel far away does not move the reading: largest component wins
    img = S.draw_shape("circle", "yellow", "large", "right")[None].copy()
    img[0, 0, 0] = 255
    read = S.analyze(img)
    assert (read["shape"][0], read["color"][0], read["position"][0]) == (0, 3, 1)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        S.analyze(np.full((1, 32, 32, 3), -1.0, np.float32))
    with pytest.raises(DataError, match="32, 32, 3"):
        S.analyze(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(DataError, match="at least one"):
        S.adherence(blank, {"jitter": np.zeros((2, 3))})


def test_caption_adherence_per_prompt_and_overall():
    """Generator images read back against their own captions score 1; against a caption that
    names another colour, that prompt's colour (and "all") score 0 and the overall mean drops."""
    from jaxgen.eval.shapes import caption_adherence, format_adherence

    ds = S.generate_split("test", 12, seed=3)
    captions = [S.caption(*(int(ds[a][i]) for a in S.ATTRIBUTES)) for i in range(12)]
    report = caption_adherence(captions, ds["image"])
    assert report["overall"] == {a: 1.0 for a in (*S.ATTRIBUTES, "all")}
    own = S.COLORS[int(ds["color"][0])]
    wrong = next(w for w in (captions[0].replace(f" {own} ", f" {c} ") for c in S.COLORS if c != own)
                 if w not in captions)     # a caption no other image has
    report = caption_adherence([wrong] + captions[1:], ds["image"])
    assert report["per_prompt"][wrong]["color"] == 0.0 and report["per_prompt"][wrong]["shape"] == 1.0
    assert report["overall"]["color"] == pytest.approx(11 / 12) and report["overall"]["position"] == 1.0
    table = format_adherence(report)
    assert wrong in table and table.splitlines()[-1].startswith("overall")
    with pytest.raises(DataError, match="not a canonical shapes caption"):
        caption_adherence(["a red blob"] + captions[1:], ds["image"])
