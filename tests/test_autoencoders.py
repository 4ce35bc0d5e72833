"""The autoencoder family: corruptions, losses, modules, and each task's evaluation path."""
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import corruption, losses
from jaxgen.nn.autoencoder import ConvAutoencoder, ConvVAE
from jaxgen.training.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_masking_noise_drops_a_fraction_rho():
    x = jnp.ones((64, 8, 8, 3))
    y = corruption.masking_noise(jax.random.key(0), x, 0.3)
    dropped = np.asarray(y[..., 0] == -1.0)
    assert abs(dropped.mean() - 0.3) < 0.02
    assert (np.asarray(y == -1.0).all(-1) == dropped).all()  # whole pixels, all channels


def test_gaussian_noise_and_rectangles():
    x = jnp.zeros((32, 8, 8, 1))
    y = corruption.gaussian_noise(jax.random.key(1), x, 0.5)
    assert abs(float(y.std()) - 0.5) < 0.02
    m = corruption.random_rectangles(jax.random.key(2), (50, 16, 16, 3), 3, 6)
    area = np.asarray(m).sum((1, 2, 3))
    assert m.shape == (50, 16, 16, 1) and area.min() >= 9 and area.max() <= 36
    with pytest.raises(ValueError, match="corruption kind"):
        corruption.corrupt(jax.random.key(0), x, "salt")


def test_losses_known_values():
    assert float(losses.gaussian_kl_standard(jnp.zeros((2, 3)), jnp.zeros((2, 3)))) == 0.0
    # KL(N(1, e) || N(0, 1)) per dim = 0.5 * (1 + e - 1 - 1) = 0.5 * (e - 1)
    kl = losses.gaussian_kl_standard(jnp.ones((1, 4)), jnp.ones((1, 4)))
    np.testing.assert_allclose(float(kl), 4 * 0.5 * (np.e - 1), rtol=1e-6)
    nll = losses.bernoulli_nll(jnp.zeros((1, 10)), jnp.ones((1, 10)))
    np.testing.assert_allclose(float(nll), 10 * np.log(2), rtol=1e-6)
    assert float(losses.l1_sparsity(jnp.array([[1.0, -2.0], [0.0, 3.0]]))) == 3.0
    assert float(losses.masked_mse(jnp.ones((1, 2)), jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]]))) == 1.0


def test_vae_reparameterisation_and_skip_decode_error():
    m = ConvVAE(channels=(8, 16), hidden_dim=16, latent_dim=3)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    p = m.init(jax.random.key(0), x)
    q = m.apply(p, x, method="encode")
    assert q.mean.shape == (4, 3) and q.logvar.shape == (4, 3)
    # the gradient reaches the encoder through the sample (reparameterisation)
    g = jax.grad(lambda pp: jnp.sum(m.apply(pp, x, jax.random.key(1))[0]))(p)
    assert float(jnp.abs(g["params"]["to_code"]["kernel"]).sum()) > 0
    img = m.apply(p, q.mean, method="decode")
    assert float(jnp.abs(img).max()) <= 1.0
    skip = ConvAutoencoder(channels=(8, 16), hidden_dim=16, skip=True)
    ps = skip.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="encoder's feature maps"):
        skip.apply(ps, jnp.zeros((1, 2)), method="decode")


@pytest.mark.parametrize("name,arg,keys", [
    ("digits_ae", "tiny", {"test_mse", "pca_test_mse", "knn5_accuracy", "pca_knn5_accuracy"}),
    ("digits_ae", "tiny,anomaly", {"anomaly_auroc"}),
    ("digits_dae", "tiny", {"denoising_mse", "noisy_input_mse"}),
    ("digits_sparse_ae", "tiny", {"code_l1", "code_fraction_near_zero"}),
    ("digits_vae", "tiny,latent2", {"test_neg_elbo_nats", "sample_confidence", "sample_class_entropy"}),
])
def test_eval_paths(name, arg, keys, tmp_path, data_dir):
    c = importlib.import_module(f"configs.{name}").get_config(arg)
    run = train(c, str(tmp_path / "run"))
    out = run.task.evaluate(run, str(tmp_path / "eval"))
    assert keys <= set(out), out
    assert all(np.isfinite(v) for v in out.values() if isinstance(v, float))
    pngs = set(os.listdir(tmp_path / "eval"))
    assert "reconstructions.png" in pngs
    if name == "digits_vae":
        assert {"samples.png", "interpolations.png", "latent_map.png"} <= pngs
        assert run.sample(3).shape == (3, 8, 8, 1)
    if name == "digits_dae":
        assert "iterated_denoising.png" in pngs


def test_cli_eval_and_sample(tmp_path, data_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    wd = str(tmp_path / "ae")
    for cmd in (["train", "--config", "configs/digits_ae.py:tiny", f"--workdir={wd}"],
                ["train.eval", f"--workdir={wd}"],
                ["train.sample", f"--workdir={wd}", "--num=6", f"--out={tmp_path}/s.npz"],
                ["train.sample", f"--workdir={wd}", "--num=6", f"--out={tmp_path}/s.png"]):
        out = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.load(open(os.path.join(wd, "eval.json")))
    assert metrics["step"] == 2 and "knn5_accuracy" in metrics
    assert np.load(f"{tmp_path}/s.npz")["images"].shape == (6, 8, 8, 1)
    assert os.path.getsize(f"{tmp_path}/s.png") > 0
