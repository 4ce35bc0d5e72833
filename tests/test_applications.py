"""What autoencoders are used for: inpainting, colorization, anomaly detection; the photos dataset."""
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import corruption, losses
from jaxgen.data import load_dataset, photos
from jaxgen.data.pipeline import images_to_float
from jaxgen.errors import DataError
from jaxgen.eval import baselines
from jaxgen.eval.anomaly import anomaly_report, compare_runs
from jaxgen.training.run import Run
from jaxgen.training.stages import stage_config
from jaxgen.training.tasks import make_task


def random_params(task, seed=0):
    """Parameters of the task's shapes drawn from N(0, 0.1^2) (no init to compile: the evaluation
    paths under test do not depend on the values)."""
    shapes = jax.eval_shape(task.init_params, jax.random.key(0), task.example_batch())
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)


def fresh_run(name, arg, workdir):
    """A Run of config ``name:arg`` with random parameters (evaluation paths only)."""
    c = importlib.import_module(f"configs.{name}").get_config(arg)
    task = make_task(c)
    return Run(config=c, task=task, params=random_params(task), step=0, workdir=str(workdir))


def test_occluders_lie_inside_the_image_and_only_they_change():
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (64, 12, 12, 3)), jnp.float32)
    occluded, hole = jax.jit(corruption.occlude, static_argnums=(2, 3, 4))(jax.random.key(1), x, 3, 7, 0.0)
    hole = np.asarray(hole)[..., 0]
    for h in hole:
        rows, cols = np.nonzero(h.any(1))[0], np.nonzero(h.any(0))[0]
        assert 3 <= len(rows) <= 7 and 3 <= len(cols) <= 7
        assert h.sum() == len(rows) * len(cols)  # one full rectangle, clipped by nothing
        assert rows[-1] - rows[0] + 1 == len(rows) and cols[-1] - cols[0] + 1 == len(cols)
    occluded = np.asarray(occluded)
    assert (occluded[hole > 0] == 0.0).all()
    np.testing.assert_array_equal(occluded[hole == 0], np.asarray(x)[hole == 0])
    assert len({h.tobytes() for h in hole}) > 32  # positions and sizes vary per image


def test_inpainting_loss_is_taken_on_the_hole_only(tmp_path, data_dir):
    run = fresh_run("shapes_inpaint", "tiny", tmp_path)
    task = run.task
    images = task.load_data("test").images[::100][:16]
    key = jax.random.key(3)
    loss, metrics = jax.jit(task.loss_fn)(run.params, {"image": images}, key)
    x = images_to_float(jnp.asarray(images))
    xin, hole = task.occlude(key, x)
    recon = task.denoise(run.params, np.asarray(xin))  # the jitted forward pass inpaint uses
    assert float(loss) == pytest.approx(float(losses.masked_mse(recon, x, hole)), rel=1e-5)
    assert float(loss) != pytest.approx(float(losses.mse(recon, x)), rel=1e-3)
    # the restored image keeps every visible pixel
    restored = task.inpaint(run.params, images, np.asarray(hole))
    np.testing.assert_array_equal(restored[np.asarray(hole)[..., 0] == 0], images[np.asarray(hole)[..., 0] == 0])


def test_blurred_fill_baseline():
    holes = np.zeros((2, 10, 10, 1))
    holes[:, 3:7, 2:8] = 1
    const = np.full((2, 10, 10, 3), 0.37)
    np.testing.assert_allclose(baselines.blurred_fill(const, holes, 2.0), const, atol=1e-12)
    ramp = np.broadcast_to(np.linspace(0, 1, 10)[None, None, :, None], (2, 10, 10, 3)).copy()
    filled = baselines.blurred_fill(ramp, holes, 1.5)
    np.testing.assert_array_equal(filled[holes[..., 0] == 0], ramp[holes[..., 0] == 0])
    inside = filled[:, 3:7, 2:8, 0]
    assert (np.diff(inside, axis=-1) > 0).all()  # the fill follows the ramp left to right
    assert inside.min() > 0 and inside.max() < 1


def test_grey_is_luminance():
    x = jnp.asarray([[[[1.0, -1.0, -1.0], [0.2, 0.2, 0.2]]]])  # red and a grey, in [-1, 1]
    g = np.asarray(corruption.to_grey(x))
    assert g.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(g[0, 0, 0], 0.299 - 0.587 - 0.114, atol=1e-6)
    np.testing.assert_allclose(g[0, 0, 1], 0.2, atol=1e-6)


def test_photo_patches_are_deterministic_and_split_by_region():
    a, b = photos.patch_positions("train"), photos.patch_positions("train")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    test = photos.patch_positions("test")
    assert len(a["left"]) == 4096 and len(test["left"]) == 512
    assert (a["left"] + photos.PATCH <= photos.COLUMNS["train"][1]).all()
    assert (test["left"] >= photos.COLUMNS["test"][0]).all()
    assert (test["left"] + photos.PATCH <= 640).all() and (a["top"] + photos.PATCH <= 427).all()
    assert set(np.unique(a["label"]).tolist()) == {0, 1}
    with pytest.raises(DataError, match="splits"):
        photos.patch_positions("heldout")


def test_photos_dataset_matches_the_photographs(data_dir):
    ds = load_dataset("photos", "test")
    assert ds.images.shape == (512, 32, 32, 3) and ds.num_classes == 2
    src = photos.load_photos()
    for j in (0, 300, 511):
        k, t, x = ds.labels[j], ds.attributes["top"][j], ds.attributes["left"][j]
        np.testing.assert_array_equal(ds.images[j], src[k, t:t + 32, x:x + 32])


@pytest.mark.parametrize("name,keys,png", [
    ("shapes_inpaint", {"hole_mse", "blurred_fill_mse", "blurred_fill_sigma", "ratio_to_blurred_fill",
                        "fill_value_mse"}, "inpainting.png"),
    ("photos_colorize", {"colour_mse", "mean_colour_mse", "grey_input_mse", "luminance_lut_mse",
                         "ratio_to_mean_colour"}, "colorization.png"),
])
def test_application_evaluate_keys(name, keys, png, tmp_path, data_dir):
    run = fresh_run(name, "tiny", tmp_path)
    out = run.task.evaluate(run, str(tmp_path))
    assert keys <= set(out), out
    assert all(np.isfinite(v) for v in out.values() if isinstance(v, float))
    assert os.path.getsize(tmp_path / png) > 0
    assert run.task.preview(run.params, {"image": run.task.load_data("test").images[:4]}).dtype == np.uint8


def test_anomaly_report_known_case():
    errors = np.array([0.1, 0.2, 0.3, 0.25, 0.4])
    labels = np.array([0, 1, 2, 8, 8])
    r = anomaly_report(errors, labels, (8,))
    # 6 (normal, anomalous) pairs; the anomalous error is higher in 5 of them
    assert r["anomaly_auroc"] == pytest.approx(5 / 6)
    assert r["num_anomalous"] == 2 and r["normal_mse"] == pytest.approx(0.2)
    assert anomaly_report(np.array([0.1, 0.9]), np.array([1, 8]), [8])["anomaly_auroc"] == 1.0
    with pytest.raises(DataError, match="exclude_labels"):
        anomaly_report(errors, labels, (7,))


def test_compare_runs_side_by_side(tmp_path, data_dir):
    runs = {"ae": fresh_run("digits_ae", "tiny,anomaly", tmp_path / "ae"),
            "vae": fresh_run("digits_vae", "tiny,anomaly", tmp_path / "vae")}
    table = compare_runs(runs, str(tmp_path / "out"))
    assert set(table) == {"ae", "vae"} and all(0 <= t["anomaly_auroc"] <= 1 for t in table.values())
    assert json.load(open(tmp_path / "out" / "anomaly.json"))["vae"]["anomaly_digits"] == [8]
    assert {"anomaly_roc.png", "anomaly_reconstructions.png"} <= set(os.listdir(tmp_path / "out"))
    # the training data of an :anomaly run has no 8, also for the VQ-VAE stage
    assert 8 not in runs["vae"].task.batch_arrays(runs["vae"].task.load_data("train"))["label"]
    c = importlib.import_module("configs.digits_vqvae").get_config("tiny,anomaly")
    vq = make_task(c).stage_task("vqvae", {}, stage_config(c, "vqvae"))
    labels = vq.batch_arrays(vq.load_data("train"))["label"]
    assert 8 not in labels and len(labels) > 1000
    with pytest.raises(DataError, match="same labels"):
        compare_runs({"ae": runs["ae"], "plain": fresh_run("digits_ae", "tiny", tmp_path / "p")}, str(tmp_path))
