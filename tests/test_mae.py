"""Masked autoencoder: patch masking, patchify, the masked-patch loss, the module, the task."""
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import corruption, losses
from jaxgen.nn.mae import MaskedAutoencoder, patchify, sincos_pos_embed_2d, unpatchify
from jaxgen.training.run import Run
from jaxgen.training.tasks import make_task

masking = jax.jit(corruption.random_masking, static_argnums=(1, 2, 3))


def test_random_masking_keeps_a_fixed_number_per_example_and_restores_order():
    n, num, ratio = 32, 16, 0.75
    ids_keep, ids_restore, mask = masking(jax.random.key(0), n, num, ratio)
    keep = corruption.num_kept_patches(num, ratio)
    assert keep == 4 and ids_keep.shape == (n, keep) and ids_restore.shape == (n, num)
    mask = np.asarray(mask)
    assert (mask.sum(1) == num - keep).all()
    # the kept ids are exactly the visible positions
    for row_keep, row_mask in zip(np.asarray(ids_keep), mask):
        assert sorted(row_keep.tolist()) == np.nonzero(row_mask == 0)[0].tolist()
    # different examples hide different patches
    assert len({row.tobytes() for row in mask}) > n // 2
    # ids_restore undoes the shuffle: [kept tokens, mask tokens] put back in image order
    positions = jnp.broadcast_to(jnp.arange(num), (n, num))
    kept = jnp.take_along_axis(positions, ids_keep, axis=1)
    tokens = jnp.concatenate([kept, -jnp.ones((n, num - keep), positions.dtype)], axis=1)
    restored = np.asarray(jnp.take_along_axis(tokens, ids_restore, axis=1))
    np.testing.assert_array_equal(restored == -1, mask == 1)
    np.testing.assert_array_equal(restored[mask == 0], np.asarray(positions)[mask == 0])
    assert corruption.num_kept_patches(64, 0.75) == 16 and corruption.num_kept_patches(10, 0.66) == 3
    with pytest.raises(ValueError, match="mask_ratio"):
        corruption.num_kept_patches(16, 1.0)


@pytest.mark.parametrize("p", [2, 4])
def test_patchify_round_trip(p):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    patches = patchify(x, p)
    assert patches.shape == (2, (8 // p) ** 2, p * p * 3)
    np.testing.assert_array_equal(patches[:, 1], x[:, :p, p:2 * p, :].reshape(2, -1))  # row-major grid
    np.testing.assert_array_equal(unpatchify(patches, p, 3), x)


def test_masked_patch_loss_ignores_visible_patches_and_norm_pix():
    rng = np.random.default_rng(1)
    patches = jnp.asarray(rng.normal(size=(4, 16, 12)), jnp.float32)
    pred = jnp.asarray(rng.normal(size=(4, 16, 12)), jnp.float32)
    mask = np.asarray(masking(jax.random.key(3), 4, 16, 0.75)[2])
    base = float(losses.masked_patch_loss(pred, patches, mask))
    changed_visible = jnp.where(mask[..., None] == 0, pred + 5.0, pred)
    assert float(losses.masked_patch_loss(changed_visible, patches, mask)) == pytest.approx(base, rel=1e-6)
    changed_hidden = jnp.where(mask[..., None] == 1, pred + 5.0, pred)
    assert float(losses.masked_patch_loss(changed_hidden, patches, mask)) > base + 1.0
    manual = np.sum(np.mean((np.asarray(pred) - np.asarray(patches)) ** 2, -1) * mask) / mask.sum()
    assert base == pytest.approx(float(manual), rel=1e-5)
    # norm_pix: targets standardised per patch, so an affine change of a patch changes nothing
    norm = float(losses.masked_patch_loss(pred, patches, mask, norm_pix=True))
    assert norm != pytest.approx(base)
    assert float(losses.masked_patch_loss(pred, 3.0 * patches + 2.0, mask, norm_pix=True)) == pytest.approx(norm, rel=1e-4)
    target = losses.normalize_patches(patches)
    assert float(losses.masked_patch_loss(target, patches, mask, norm_pix=True)) < 1e-10
    np.testing.assert_allclose(np.asarray(target).mean(-1), 0.0, atol=1e-5)


def test_sincos_positions_are_distinct():
    emb = sincos_pos_embed_2d(4, 32)
    assert emb.shape == (16, 32) and emb.dtype == np.float32
    d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    assert (d + np.eye(16) > 1e-3).all()


def test_module_sees_only_the_visible_patches():
    m = MaskedAutoencoder(image_size=8, in_channels=1, patch_size=2, hidden_size=32, num_layers=1,
                          num_heads=2, decoder_hidden_size=16, decoder_num_heads=2)
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (3, 8, 8, 1)), jnp.float32)
    key = jax.random.key(5)
    params = jax.jit(m.init)(jax.random.key(0), x, key)
    apply = jax.jit(lambda p, xx: m.apply(p, xx, key))
    pred, mask = apply(params, x)
    assert pred.shape == (3, 16, 4) and mask.shape == (3, 16)
    # scribbling over the hidden patches does not change any prediction
    hidden = unpatchify(jnp.broadcast_to(mask[..., None], (3, 16, 4)), 2, 1)
    pred2, _ = apply(params, jnp.where(hidden > 0, 0.9, x))
    np.testing.assert_allclose(pred2, pred, atol=1e-6)
    # ... while changing a visible one does
    pred3, _ = apply(params, jnp.where(hidden > 0, x, -x))
    assert float(jnp.abs(pred3 - pred).max()) > 1e-3
    assert jax.eval_shape(lambda: m.apply(params, x, method="features")).shape == (3, 32)


def test_mae_task_evaluate_keys(tmp_path, data_dir):
    c = importlib.import_module("configs.digits_mae").get_config("tiny")
    task = make_task(c)
    params = jax.jit(task.init_params)(jax.random.key(0), task.example_batch())
    loss, metrics = jax.jit(task.loss_fn)(params, {"image": task.load_data("train").images[:16]},
                                          jax.random.key(1))
    assert np.isfinite(float(loss)) and {"masked_loss", "visible_loss"} <= set(metrics)
    run = Run(config=c, task=task, params=params, step=0, workdir=str(tmp_path))
    out = task.evaluate(run, str(tmp_path))
    assert {"masked_patch_mse", "mean_patch_fill_mse", "ratio_to_mean_patch_fill", "probe_label_mae",
            "probe_label_pixels"} <= set(out)
    assert 0 < out["mean_patch_fill_mse"] < 1 and 0.5 < out["probe_label_pixels"] <= 1
    assert os.path.getsize(tmp_path / "masked_reconstructions.png") > 0
    images = task.load_data("test").images[:5]
    assert run.reconstruct(images).shape == images.shape and run.encode(images).shape == (5, 32)
    # the visible patches of a reconstruction are the input's
    _, mask = task.predict_masked(params, images)
    recon = np.asarray(patchify(run.reconstruct(images), 2))
    np.testing.assert_array_equal(recon[mask == 0], np.asarray(patchify(images, 2))[mask == 0])


def test_norm_pix_predictions_map_back_to_pixels(data_dir):
    task = make_task(importlib.import_module("configs.digits_mae").get_config("tiny,normpix"))
    assert task.norm_pix
    images = task.load_data("test").images[:8]
    patches = patchify(images.astype(np.float32) / 127.5 - 1.0, 2)
    standardised = np.asarray(losses.normalize_patches(jnp.asarray(patches)))
    np.testing.assert_allclose(task.to_pixels(standardised, images), patches, atol=1e-3)
    np.testing.assert_allclose(task.target_patches(images), standardised, atol=1e-6)
