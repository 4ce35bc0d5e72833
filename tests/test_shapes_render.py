"""The independent shapes renderer (jaxgen.data.shapes_render) and the analyzer read on its images."""
import numpy as np
import pytest

from jaxgen.data import shapes as S
from jaxgen.data import shapes_render as R
from jaxgen.errors import DataError


def _box(image):
    on = image.max(-1) > 0
    ys, xs = np.nonzero(on)
    return xs.min(), xs.max() + 1, ys.min(), ys.max() + 1     # x0, x1, y0, y1 (exclusive ends)


def test_render_geometry_and_colours():
    # a 10 px square centred on (8.3, 16.0): it spans x in [3.3, 13.3]: pixels 3..12 are more
    # than half covered, y in [11, 21]: rows 11..20
    img = R.render("square", "yellow", "small", "left", center=(8.3, 16.0), width=10.0)
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    assert _box(img) == (3, 13, 11, 21)
    assert (img[11:21, 3:13] == [255, 255, 0]).all() and img.sum() == 100 * 2 * 255
    # pure colour on black, nothing else
    for k, name in enumerate(S.COLORS):
        im = R.render("circle", name, "large", "center", center=(15.4, 16.7), width=16.6)
        colours = np.unique(im.reshape(-1, 3), axis=0)
        np.testing.assert_array_equal(colours, np.stack([np.zeros(3, np.uint8), S.COLOR_RGB[k]]))
    # a disc never reaches its box's corners; an upright triangle is wide at the bottom, narrow on top
    disc = R.render("circle", "red", "large", "center").max(-1) > 0
    x0, x1, y0, y1 = _box(R.render("circle", "red", "large", "center"))
    assert not disc[[y0, y0, y1 - 1, y1 - 1], [x0, x1 - 1, x0, x1 - 1]].any()
    tri = R.render("triangle", "blue", "large", "bottom", center=(16.6, 23.2), width=15.3).max(-1) > 0
    widths = tri.sum(1)[tri.any(1)]
    assert widths[0] <= 2 and widths[-1] >= 14 and (np.diff(widths) >= 0).all()


def test_render_refuses_out_of_spec():
    with pytest.raises(DataError, match="jitter"):
        R.render("circle", "red", "small", "left", center=(10.5, 16))        # 2.5 px off
    with pytest.raises(DataError, match="jitter"):
        R.render("circle", "red", "small", "left", width=10.5)
    with pytest.raises(DataError, match="canvas"):
        R.render("circle", "red", "large", "left", center=(6.5, 16))         # leaves the canvas
    with pytest.raises(DataError, match="supersample"):
        R.render("circle", "red", "small", "left", supersample=0)
    with pytest.raises(DataError, match="coverage"):
        R.render("circle", "red", "small", "left", coverage=1.0)
    with pytest.raises(DataError, match="unknown shape"):
        R.render("hexagon", "red", "small", "left")


def test_independent_split_is_balanced_and_deterministic():
    d = R.independent_split(360, seed=3)
    assert np.bincount(d["label"], minlength=180).tolist() == [2] * 180
    for j in (0, 57, 359):
        assert S.parse_caption(d["caption"][j]) == {a: int(d[a][j]) for a in S.ATTRIBUTES}
    np.testing.assert_array_equal(R.independent_split(360, seed=3)["image"], d["image"])
    assert not np.array_equal(R.independent_split(360, seed=4)["image"], d["image"])
    nominal = np.asarray(S.POSITION_CENTERS)[d["position"]]
    assert np.abs(d["center"] - nominal).max() <= S.POSITION_JITTER
    assert np.abs(d["width"] - np.asarray(S.SIZE_PIXELS)[d["size"]]).max() <= S.SIZE_JITTER
    # sub-pixel: the centres and widths are not on the generator's integer grid
    assert np.abs(d["width"] - np.round(d["width"])).max() > 0.1
    # a different rasterisation: many renders differ from the generator's nearest integer drawing
    differ = 0
    for j in range(0, 360, 9):
        w = int(np.round(d["width"][j]))
        nx, ny = S.POSITION_CENTERS[d["position"][j]]
        jit = (w - S.SIZE_PIXELS[d["size"][j]], int(np.round(d["center"][j, 0] - nx)),
               int(np.round(d["center"][j, 1] - ny)))
        gen = S.draw_shape(*(int(d[a][j]) for a in S.ATTRIBUTES), jitter=np.clip(jit, [-1, -2, -2], [1, 2, 2]))
        differ += not np.array_equal(gen, d["image"][j])
    assert differ >= 20


@pytest.mark.parametrize("supersample,coverage", [(4, 0.5), (1, 0.0), (8, 0.3), (8, 0.7)])
def test_analyzer_reads_independent_renders(supersample, coverage):
    d = R.independent_split(1800, seed=11, supersample=supersample, coverage=coverage)
    read = S.analyze(d["image"])
    assert read["found"].all()
    for a in S.ATTRIBUTES:
        acc = float(np.mean(read[a] == d[a]))
        assert acc >= 0.99, (a, acc)
    if (supersample, coverage) == (4, 0.5):   # the default: each shape on its own, too (the analyzer
        for k, name in enumerate(S.SHAPES):   # read 2 % of these small discs as squares before it
            recall = float(np.mean(read["shape"][d["shape"] == k] == k))   # looked at box corners)
            assert recall >= 0.99, (name, recall)
    # and on the generator's own images, every attribute stays exact
    gen = S.generate_split("test", 540, seed=5)
    read = S.analyze(gen["image"])
    for a in S.ATTRIBUTES:
        assert (read[a] == gen[a]).all(), a


def test_continuous_geometry_option():
    from jaxgen.data import load_dataset

    ds = load_dataset("shapes", "train", geometry="continuous", num_examples=324, masks=True)
    assert ds.images.shape == (324, 32, 32, 3) and ds.arrays["mask"].shape == (324, 32, 32, 1)
    assert not set(ds.labels.tolist()) & set(S.HELDOUT_COMBINATIONS)
    assert ds.captions[5] == S.caption(*(int(ds.attributes[a][5]) for a in S.ATTRIBUTES))
    read = S.analyze(ds.images)
    for a in S.ATTRIBUTES:
        assert np.mean(read[a] == ds.attributes[a]) >= 0.99, a
    held = load_dataset("shapes", "heldout", geometry="continuous")
    assert set(held.labels.tolist()) == set(S.HELDOUT_COMBINATIONS)
    # half the generator's pixels (integer jitter), half sub-pixel pixel-centre renders
    data = R.continuous_split("train", 40, seed=1)
    assert np.all(data["width"][0::2] == np.round(data["width"][0::2]))
    assert np.abs(data["width"][1::2] - np.round(data["width"][1::2])).max() > 0.1
    for bad, match in (({"geometry": "smooth"}, "geometry"), ({"geometry": "continuous", "edits": True}, "edits")):
        with pytest.raises(DataError, match=match):
            load_dataset("shapes", "train", **bad)


def test_value_prompt_zero_shot():
    """Per-value prompt sets (every canonical caption of a value, averaged) read each attribute of
    additive embeddings, and fail on images whose classes are scrambled."""
    from types import SimpleNamespace

    from jaxgen.training.tasks.clip import CaptionSpace, ClipTask

    space = SimpleNamespace(space=CaptionSpace("shapes"))                       # all the method reads
    zero_shot = lambda *args: ClipTask.value_prompt_zero_shot(space, *args)    # noqa: E731
    rng = np.random.default_rng(0)
    attrs = S.combination_attributes(np.arange(S.NUM_COMBINATIONS))
    parts = {a: rng.normal(size=(len(S.ATTRIBUTE_NAMES[a]), 32)) for a in S.ATTRIBUTES}
    text = sum(parts[a][attrs[a]] for a in S.ATTRIBUTES)                         # [180, 32]
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    class_embeds = np.repeat(text[:, None], 2, axis=1).astype(np.float32)         # [180, T=2, 32]
    classes = np.arange(S.NUM_COMBINATIONS)
    images = (text + 0.05 * rng.normal(size=text.shape)).astype(np.float32)
    accs = zero_shot(images, classes, class_embeds)
    assert all(v >= 0.95 for v in accs.values()), accs   # normalising makes it not quite exact
    wrong = zero_shot(images, rng.permutation(classes), class_embeds)
    assert all(v < 0.7 for v in wrong.values()), wrong
