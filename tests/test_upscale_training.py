"""A shapes upscaler trained on a frozen latent-diffusion run (task "upscale",
configs/shapes_upscale.py): the latent-space rescaling that lets diffusers' fixed 0.08333 scaling
decode the run's latents, the run's upscale ability, evaluation, and diffusers'
StableDiffusionUpscalePipeline reproducing the export.
"""
import importlib
import json
import os

import jax
import numpy as np
import pytest
from helpers import shared_tiny_ldm

import jaxgen
from jaxgen.data import shapes
from jaxgen.data.pipeline import box_downsample
from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.vae import rescale_latent_space
from jaxgen.pipelines.export import export_stable_diffusion
from jaxgen.training.trainer import train

PROMPTS = ["a small red circle on the left", "a large blue square at the top"]


def tiny_config(base: str):
    c = importlib.import_module("configs.shapes_upscale").get_config("tiny")
    c.base_run = base
    return c


@pytest.fixture(scope="module")
def base(data_dir):
    return shared_tiny_ldm()


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    return train(tiny_config(base.workdir), str(tmp_path_factory.mktemp("up") / "run"))


def low_res(run):
    images = np.stack([shapes.draw_shape("circle", "red", "small", "left"),
                       shapes.draw_shape("square", "blue", "large", "top")])
    return box_downsample(images, run.task.ldm.vae_factor)


def test_rescaled_latent_space_is_the_same_autoencoder(base):
    vae, params = base.task.vae, base.params["vae"]
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    new = rescale_latent_space(vae, params, 2.5)
    p0 = vae.apply({"params": params}, x, method="encode")
    p1 = vae.apply({"params": new}, x, method="encode")
    np.testing.assert_allclose(p1.mean, 2.5 * p0.mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p1.std, 2.5 * p0.std, rtol=1e-4, atol=1e-5)
    z = jax.random.normal(jax.random.key(1), p0.mean.shape)
    np.testing.assert_allclose(vae.apply({"params": new}, 2.5 * z, method="decode"),
                               vae.apply({"params": params}, z, method="decode"), atol=1e-5)
    with pytest.raises(ConfigError, match="positive"):
        rescale_latent_space(vae, params, 0.0)


def test_upscale(run):
    out = run.upscale(low_res(run), PROMPTS)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, run.upscale(low_res(run), PROMPTS))
    assert not np.array_equal(out, run.upscale(low_res(run), PROMPTS, noise_level=300))
    with pytest.raises(DataError, match="run.upscale takes uint8 images"):
        run.upscale(np.zeros((2, 32, 32, 3), np.uint8), PROMPTS)
    with pytest.raises(ValueError, match="max_noise_level"):
        run.upscale(low_res(run), PROMPTS, noise_level=351)


def test_evaluate(run, tmp_path):
    out = run.task.evaluate(run, str(tmp_path))
    rec = out["reconstruction"]
    assert np.isfinite(rec["psnr_upscaler"]) and np.isfinite(rec["psnr_bicubic"])
    assert set(rec["read_back_upscaler"]) == set(shapes.ATTRIBUTES)
    assert set(out["text_guidance"]) >= {"true_shape_prompt", "other_shape_prompt"}
    assert os.path.getsize(tmp_path / "upscale.png") > 0


def test_export_loads_in_diffusers_and_reproduces(run, tmp_path, monkeypatch):
    import torch
    from diffusers import StableDiffusionUpscalePipeline

    folder = export_stable_diffusion(run, str(tmp_path / "up"))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
    assert index["low_res_scheduler"] == ["diffusers", "DDPMScheduler"]
    task = run.task
    low = low_res(run).astype(np.float32) / 255.0
    latents = np.asarray(jax.random.normal(jax.random.key(5), (2, *task.latent_shape)), np.float32)
    image_noise = np.asarray(jax.random.normal(jax.random.key(6), low.shape), np.float32)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, noise_level=20)
    ours = task.pipeline(run.params)(PROMPTS, image=low, latents=latents, image_noise=image_noise, **kw)
    loaded = jaxgen.StableDiffusionUpscalePipeline.from_pretrained(folder)
    np.testing.assert_allclose(loaded(PROMPTS, image=low, latents=latents, image_noise=image_noise, **kw), ours,
                               atol=1e-5)
    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder)
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale as mod

    # diffusers draws the low-res augmentation noise with randn_tensor: give it ours
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **_: torch.from_numpy(image_noise.transpose(0, 3, 1, 2).copy()))
    with torch.no_grad():
        ref = pipe(PROMPTS, image=torch.from_numpy(low.transpose(0, 3, 1, 2).copy()),
                   latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np", **kw).images
    np.testing.assert_allclose(ours, ref, atol=1e-3)
