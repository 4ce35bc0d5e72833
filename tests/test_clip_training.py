"""CLIP training and use: the global-batch loss under sharding, the clamped temperature, the run's
tokenizer, encode_text / encode_image, and evaluate() on a tiny trained run."""
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from helpers import xla_flags
from configs import shapes_clip
from jaxgen.data import shapes
from jaxgen.errors import ConfigError, DataError
from jaxgen.training.tasks import make_task
from jaxgen.training.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    wd = str(tmp_path_factory.mktemp("tiny_clip"))
    return train(shapes_clip.get_config("tiny"), wd)


def test_encoders_give_unit_vectors(tiny_run):
    run = tiny_run
    d = run.config.model.projection_dim
    texts = ["a large red circle on the left", "at the top, a small blue square", ""]
    t = run.encode_text(texts)
    assert t.shape == (3, d) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert run.encode_text("a large red circle on the left").shape == (1, d)
    images = run.task.load_data("test").images[:5]
    i = run.encode_image(images)
    assert i.shape == (5, d) and i.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(i, axis=1), 1.0, atol=1e-5)
    # the causal text tower pools at the end token: reading only the used positions is exact
    ids = run.tokenizer(texts)
    full = jax.jit(lambda p, x: run.model.apply({"params": p}, x, method="get_text_features"))(run.params, ids)
    np.testing.assert_allclose(t, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(DataError, match=r"uint8 \[N, 32, 32, 3\]"):
        run.encode_image(images[:, :16])
    with pytest.raises(DataError, match="dtype"):
        run.encode_image(images.astype(np.float32))


def test_tokenizer_is_saved_and_reloaded(tiny_run, tmp_path):
    run = tiny_run
    folder = os.path.join(run.workdir, "tokenizer")
    assert os.path.isfile(os.path.join(folder, "vocab.json"))
    assert os.path.isfile(os.path.join(folder, "merges.txt"))
    again = jaxgen.load_run(run.workdir)
    tok = again.tokenizer
    assert tok.vocab == run.task.tokenizer.vocab and tok.merges == run.task.tokenizer.merges
    assert tok.vocab_size == run.config.model.text_config.vocab_size
    text = ["a small magenta triangle at the bottom"]
    np.testing.assert_array_equal(tok(text), jaxgen.load_tokenizer(folder)(text))
    assert tok.tokenize(text[0]) == ["a</w>", "small</w>", "magenta</w>", "triangle</w>", "at</w>",
                                     "the</w>", "bottom</w>"]
    np.testing.assert_allclose(again.encode_text(text), run.encode_text(text), atol=1e-6)
    # a run directory without its tokenizer is refused, saying why
    bare = tmp_path / "bare"
    shutil.copytree(run.workdir, bare, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(ConfigError, match="keeps the tokenizer it trained with"):
        jaxgen.load_run(bare)


def test_batch_arrays_hold_every_phrasing(tiny_run):
    task = tiny_run.task
    ds = task.load_data("train")
    arrays = task.batch_arrays(ds)
    n, t = len(ds), len(shapes.CAPTION_TEMPLATES)
    assert arrays["input_ids"].shape == (n, 77) and arrays["input_ids"].dtype == np.int32
    assert arrays["alt_input_ids"].shape == (n, t - 1, 77) and arrays["alt_input_ids"].dtype == np.int32
    tok = task.tokenizer
    assert tok.decode(arrays["input_ids"][7]) == ds.captions[7]
    a = {k: int(v[7]) for k, v in ds.attributes.items()}
    assert tok.decode(arrays["alt_input_ids"][7, 2]) == shapes.caption(**a, template=3)
    # each example's phrasing is drawn from the step key: deterministic, all phrasings used
    batch = {k: jnp.asarray(v[:64]) for k, v in arrays.items()}
    picked = np.asarray(task.pick_captions(batch, jax.random.key(3)))
    np.testing.assert_array_equal(picked, task.pick_captions(batch, jax.random.key(3)))
    every = np.concatenate([arrays["input_ids"][:64, None], arrays["alt_input_ids"][:64]], axis=1)
    which = [int(np.nonzero((every[i] == picked[i]).all(1))[0][0]) for i in range(64)]
    assert set(which) == set(range(t))


def test_partial_captions(tmp_path):
    """data.partial_captions: captions naming only some attributes, drawn per example from the
    step key, and the positives matrix that says which texts fit which images."""
    assert shapes.partial_caption("circle", "red", "small", "left", ["shape"]) == "a circle"
    assert shapes.partial_caption(0, 0, 0, 0, ["color"]) == "a red shape"
    assert shapes.partial_caption(1, 2, 1, 4, ["size", "position"]) == "a large shape in the center"
    assert shapes.partial_caption(1, 2, 1, 4, shapes.ATTRIBUTES) == shapes.caption(1, 2, 1, 4)
    with pytest.raises(DataError, match="non-empty subset"):
        shapes.partial_caption(0, 0, 0, 0, [])
    task = make_task(shapes_clip.get_config("tiny,partial"))
    assert task.partial == 0.25 and len(task.space.subsets) == 14
    task.attach(str(tmp_path), training=True)
    ds = task.load_data("train")
    arrays = task.batch_arrays(ds)
    n = len(ds)
    assert arrays["partial_input_ids"].shape == (n, 14, 77) and arrays["attributes"].shape == (n, 4)
    a = {k: int(v[5]) for k, v in ds.attributes.items()}
    assert task.tokenizer.decode(arrays["partial_input_ids"][5, 0]) == shapes.partial_caption(**a, keep=["shape"])
    batch = {k: jnp.asarray(v[:48]) for k, v in arrays.items()}
    full = task.pick_captions(batch, jax.random.key(0))
    ids, pos = (np.asarray(x) for x in task.pick_partial(batch, full, jax.random.key(1)))
    partial = ~(ids == np.asarray(full)).all(1)
    assert 0 < partial.sum() < 48 and pos.diagonal().all()
    attrs = arrays["attributes"][:48]
    for j in range(48):                       # text j fits image i iff i has every value text j names
        text = task.tokenizer.decode(ids[j])
        named = [k for k, name in enumerate(shapes.ATTRIBUTES)
                 if not partial[j] or shapes.ATTRIBUTE_NAMES[name][attrs[j, k]] in text.split(" ")]
        want = (attrs[:, named] == attrs[j, named]).all(1)
        np.testing.assert_array_equal(pos[:, j], want, err_msg=text)
    loss, _ = jax.jit(task.loss_fn)(task.init_params(jax.random.key(0), batch), batch, jax.random.key(2))
    assert np.isfinite(float(loss))
    with pytest.raises(ConfigError, match="partial_captions"):
        c = shapes_clip.get_config("tiny")
        c.data.name = "digits"
        c.data.partial_captions = 0.5
        make_task(c)


def _loss_and_by_hand(task, batch):
    """(task.loss_fn's loss on batch, clip_loss(**kw) on the same embeddings as a function of kw)."""
    from jaxgen import clip_utils

    params = task.init_params(jax.random.key(0), batch)
    key = jax.random.key(2)
    loss, _ = task.loss_fn(params, batch, key)
    ids = task.pick_captions(batch, jax.random.fold_in(key, 0))[:, :task.train_context]
    out = task.model.apply({"params": params}, ids, task.pixel_values(batch["image"]))
    scale = task.clamped_logit_scale(params)
    return loss, lambda **kw: clip_utils.clip_loss(out.image_embeds, out.text_embeds, scale, **kw)


def test_class_positives(tmp_path):
    """objective.class_positives: the batch's examples of one caption class are positives of each
    other: the loss is clip_loss with the same-class matrix (CLIP's own with one example per class)."""
    c = shapes_clip.get_config("tiny,positives")
    assert c.objective.class_positives and not shapes_clip.get_config("tiny,instance").objective.class_positives
    task = make_task(c)
    task.attach(str(tmp_path), training=True)
    ds = task.load_data("train")
    arrays = task.batch_arrays(ds)
    np.testing.assert_array_equal(arrays["class_id"], task.space.classes_of(ds))
    pick = np.argsort(arrays["class_id"], kind="stable")[:48]       # 12 classes, 4 examples each
    batch = {k: jnp.asarray(v[pick]) for k, v in arrays.items()}
    same = np.asarray(batch["class_id"])[:, None] == np.asarray(batch["class_id"])[None, :]
    assert (same.sum(1) == 4).all()                       # the batch holds twins: the case that matters
    loss, by_hand = _loss_and_by_hand(task, batch)
    np.testing.assert_allclose(loss, by_hand(positives=same), rtol=1e-6)
    assert abs(float(loss) - float(by_hand())) > 1e-4
    c = shapes_clip.get_config("tiny,positives")
    c.data.name, c.data.augment_captions = "mnist", False
    with pytest.raises(ConfigError, match="class_positives"):
        make_task(c)


def test_attribute_targets(tmp_path):
    """objective.attribute_targets = beta: clip_loss's soft targets exp(beta * (shared - 4)) from the
    attributes each pair of examples shares (1 for the same class); it replaces the positives."""
    assert shapes_clip.get_config("tiny").objective.attribute_targets == 4.0    # the default
    assert not shapes_clip.get_config("tiny").objective.class_positives
    assert all(shapes_clip.get_config(f"tiny,{w}").objective.attribute_targets == 0.0
               for w in ("positives", "partial", "instance"))
    c = shapes_clip.get_config("tiny")
    c.objective.attribute_targets = 1.5
    task = make_task(c)
    task.attach(str(tmp_path), training=True)
    ds = task.load_data("train")
    arrays = task.batch_arrays(ds)
    pick = np.random.RandomState(0).choice(len(ds.images), 32, replace=False)
    batch = {k: jnp.asarray(v[pick]) for k, v in arrays.items()}
    classes = task.space.classes_of(ds)[pick]
    combo = shapes.combination_attributes(classes)
    values = np.stack([np.asarray(combo[a]) for a in shapes.ATTRIBUTES], 1)      # [32, 4]
    np.testing.assert_array_equal(batch["attributes"], values)
    shared = (values[:, None, :] == values[None, :, :]).sum(-1)
    assert (shared[classes[:, None] == classes[None, :]] == 4).all()
    assert ((shared == 4) == (classes[:, None] == classes[None, :])).all()
    loss, by_hand = _loss_and_by_hand(task, batch)
    np.testing.assert_allclose(loss, by_hand(targets=np.exp(1.5 * (shared - 4.0))), rtol=1e-6)
    for bad in ({"class_positives": True}, {"attribute_targets": -1.0}):
        c = shapes_clip.get_config("tiny")
        c.objective.update({"class_positives": False, "attribute_targets": 1.0, **bad})
        with pytest.raises(ConfigError, match="attribute_targets"):
            make_task(c)


def test_tokenizer_must_fit_the_text_config(tiny_run, tmp_path):
    c = shapes_clip.get_config("tiny")
    c.model.text_config.update({"vocab_size": 700, "bos_token_id": 698, "eos_token_id": 699,
                                "pad_token_id": 699})
    with pytest.raises(ConfigError, match=r"vocab_size=596, bos_token_id=594, eos_token_id=595"):
        make_task(c).attach(str(tmp_path / "a"), training=True)
    # a resumed run's saved tokenizer must be the one its captions give
    shutil.copytree(os.path.join(tiny_run.workdir, "tokenizer"), tmp_path / "b" / "tokenizer")
    with pytest.raises(ConfigError, match="differs from the one learned"):
        make_task(shapes_clip.get_config("tiny,canonical")).attach(str(tmp_path / "b"), training=True)


def test_temperature_is_clamped_at_100(tiny_run):
    task, params = tiny_run.task, jax.device_get(tiny_run.params)   # host arrays: one compilation
    batch = {k: v[:8] for k, v in task.batch_arrays(task.load_data("heldout")).items()}
    loss = jax.jit(lambda p: task.loss_fn(p, batch, jax.random.key(0))[0])
    above = loss({**params, "logit_scale": np.float32(7.0)})
    at_cap = loss({**params, "logit_scale": np.float32(math.log(100.0))})
    assert float(above) == pytest.approx(float(at_cap), rel=1e-6)
    assert float(loss({**params, "logit_scale": np.float32(1.0)})) != pytest.approx(float(at_cap))
    slope = jax.grad(lambda s: task.clamped_logit_scale({"logit_scale": s}))
    assert float(slope(7.0)) == 0.0 and float(slope(2.0)) == 1.0   # no gradient above the cap
    # initialised at log(1 / 0.07); two steps of lr <= 2e-3 move it by at most ~4e-3
    assert task.model.logit_scale_init_value == pytest.approx(math.log(1 / 0.07))
    assert abs(float(params["logit_scale"]) - math.log(1 / 0.07)) < 1e-2


def test_evaluate_reports_every_metric(tiny_run, tmp_path):
    out = tiny_run.task.evaluate(tiny_run, str(tmp_path))
    for split in ("heldout", "test"):
        for attr in ("shape", "color", "size", "position", "combination"):
            assert 0.0 <= out[f"{split}_zero_shot_{attr}"] <= 1.0
    for k in ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5"):
        assert 0.0 <= out[f"test_{k}"] <= 1.0
    assert out["test_image_to_text_R@1"] <= out["test_image_to_text_R@5"]
    assert 1.0 <= out["logit_scale_exp"] <= 100.0
    assert os.path.getsize(tmp_path / "similarity_matrix.png") > 1000
    json.dumps(out)   # eval.json must be able to hold it


# Runs in a subprocess with 8 host devices (XLA_FLAGS is read once per process).
SHARDED_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from configs import shapes_clip
from jaxgen.training import mesh as mesh_lib
from jaxgen.training.tasks import make_task

assert len(jax.devices()) == 8, jax.devices()
task = make_task(shapes_clip.get_config("tiny"))
v = task.text_cfg["vocab_size"]
rng = np.random.default_rng(0)
b, t = 16, 6
ids = np.full((b, t, 77), v - 1, np.int32)                    # end/pad token everywhere
ids[..., 0] = v - 2                                            # start token
for i in range(b):
    for j in range(t):
        n = int(rng.integers(1, 12))
        ids[i, j, 1:1 + n] = rng.integers(0, v - 2, n)
batch = {"image": rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8),
         "input_ids": ids[:, 0], "alt_input_ids": ids[:, 1:],
         "class_id": (np.arange(b) % 5).astype(np.int32),      # twins on other devices: class positives
         # shared attributes across devices: the default graded targets (objective.attribute_targets)
         "attributes": rng.integers(0, 2, (b, 4)).astype(np.int32)}
# random parameters of the right shapes (compiling the initialisers would cost more than the test)
shapes = jax.eval_shape(task.init_params, jax.random.key(0), task.example_batch())
params = jax.tree_util.tree_map_with_path(
    lambda path, s: np.asarray((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
                               + 0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
params["logit_scale"] = np.float32(np.log(1 / 0.07))
key = jax.random.key(1)
loss = lambda p, bt, k: task.loss_fn(p, bt, k)[0]


def one_device(p, bt, k):
    # the global loss, and what a per-shard loss (each device's 2 examples against each other
    # only, averaged over the 8 devices) would give instead
    shards = {name: x.reshape(8, b // 8, *x.shape[1:]) for name, x in bt.items()}
    return loss(p, bt, k), jnp.mean(jax.vmap(loss, in_axes=(None, 0, None))(p, shards, k))


one = jax.devices()[0]
ref, per_shard = jax.jit(one_device)(jax.device_put(params, one), jax.device_put(batch, one), key)
out = {"one_device": float(ref), "per_shard_mean": float(per_shard)}
mesh = mesh_lib.make_mesh(8, 1)
bs = mesh_lib.batch_sharding(mesh)
sharded = jax.device_put(batch, bs)
assert len(sharded["image"].sharding.device_set) == 8
f = jax.jit(loss, in_shardings=(mesh_lib.replicated(mesh), bs, mesh_lib.replicated(mesh)))
out["mesh_8x1"] = float(f(params, sharded, key))
print("RESULT" + json.dumps(out))
"""


def test_sharded_global_batch_loss_equals_one_device_loss():
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    ref = out["one_device"]
    assert abs(out["mesh_8x1"] - ref) <= 1e-6 * abs(ref), out
    # the check can tell: a loss computed per shard is a different number
    assert abs(out["per_shard_mean"] - ref) > 1e-2 * abs(ref), out
