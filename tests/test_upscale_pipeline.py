"""StableDiffusionUpscalePipeline (the SD x4 upscaler) against diffusers.

A tiny random diffusers StableDiffusionUpscalePipeline (7-channel U-Net with a noise-level class
embedding, a 3-level VAE: factor 4, 8x8 low-res -> 32x32, 3 steps) saved by diffusers; both
pipelines get the same prompts, low-res images, latents and low-res augmentation noise
(diffusers draws the latter with randn_tensor from its generator: replaced here by a function
returning our array); images must agree to 1e-3. Also: the U-Net at this config, the pure
``upscale_condition`` against diffusers' DDPMScheduler.add_noise, the pipeline built in memory,
no retracing, and the input errors.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jaxgen  # noqa: E402
from jaxgen.convert.testing import randomize_torch  # noqa: E402
from jaxgen.diffusion.schedulers import scheduler_from_config  # noqa: E402
from jaxgen.errors import ConfigError, DataError  # noqa: E402
from jaxgen.pipelines.upscale import UPSCALER_SCALING_FACTOR, upscale_condition  # noqa: E402
from helpers import check_images, max_err, nchw, nhwc, rel_err, tiny_sd_components, unit_noise  # noqa: E402

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale as upscale_module  # noqa: E402

STEPS, LOW, FACTOR = 3, 8, 4
PROMPTS = ["a large red circle on the left", "a small blue square at the top"]
NEGATIVE = ["a green triangle", ""]
UNET = dict(sample_size=LOW, in_channels=7, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
            norm_num_groups=4, use_linear_projection=True, num_class_embeds=400)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16),
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           layers_per_block=1, norm_num_groups=4, sample_size=LOW * FACTOR, scaling_factor=0.08333)
LOW_RES = dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)       # the x4 upscaler's
MAIN = dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A diffusers StableDiffusionUpscalePipeline folder; returns (path, diffusers pipeline read back)."""
    root = tmp_path_factory.mktemp("upscale")
    common = tiny_sd_components(root)
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=randomize_torch(diffusers.AutoencoderKL(**VAE), 3), text_encoder=common["text_encoder"],
        tokenizer=common["tokenizer"], unet=randomize_torch(diffusers.UNet2DConditionModel(**UNET), 1),
        low_res_scheduler=diffusers.DDPMScheduler(**LOW_RES), scheduler=diffusers.DDIMScheduler(**MAIN),
        max_noise_level=350)
    path = str(root / "pipe")
    pipe.save_pretrained(path)
    loaded = diffusers.StableDiffusionUpscalePipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    return path, loaded


@pytest.fixture(scope="module")
def pipe(folder):
    return jaxgen.StableDiffusionUpscalePipeline.from_pretrained(folder[0])


def low_res_images(seed, n=len(PROMPTS)):
    """Blocky random RGB images [n, LOW, LOW, 3] in [0, 1] (2x2-pixel cells)."""
    cells = np.random.default_rng(seed).uniform(0, 1, (n, LOW // 2, LOW // 2, 3)).astype(np.float32)
    return np.repeat(np.repeat(cells, 2, axis=1), 2, axis=2)


def diffusers_upscale(ref_pipe, monkeypatch, image_noise, **kwargs):
    """diffusers' call with its one generator draw (the low-res augmentation noise, drawn with
    randn_tensor in the shape of the preprocessed image) replaced by image_noise [N, h, w, 3]."""
    calls = []
    given = nchw(image_noise)

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(given.shape), (shape, given.shape)
        calls.append(tuple(shape))
        return given.clone().to(dtype)

    monkeypatch.setattr(upscale_module, "randn_tensor", randn)
    out = ref_pipe(output_type="np", **kwargs).images
    assert len(calls) == 1
    return out


def with_scheduler(pt_pipe, name):
    out = type(pt_pipe)(**{**pt_pipe.components, "scheduler": getattr(diffusers, name).from_config(pt_pipe.scheduler.config)})
    out.set_progress_bar_config(disable=True)
    return out


def test_unet_with_noise_level_class_embedding(folder, pipe):
    """The 7-channel U-Net with num_class_embeds (class_labels = noise levels) equals diffusers'."""
    pt = folder[1].unet
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, LOW, LOW, 7)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    t, labels = np.array([10, 900]), np.array([20, 350])
    with torch.no_grad():
        ref = nhwc(pt(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), class_labels=torch.from_numpy(labels)).sample)
    fwd = jax.jit(lambda p, lab: pipe.unet.apply({"params": p}, x, t, ctx, class_labels=lab))
    err = rel_err(fwd(pipe.params["unet"], labels), ref)
    print(f"upscaler U-Net: rel. error {err:.2e}")
    assert err <= 1e-5
    assert rel_err(fwd(pipe.params["unet"], labels[::-1]), ref) > 1e-3      # the noise level reaches the network


def test_upscale_condition_is_low_res_add_noise():
    """upscale_condition == diffusers' DDPMScheduler.add_noise, with per-example noise levels."""
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    levels = np.array([0, 20, 350])
    ref = nhwc(diffusers.DDPMScheduler(**LOW_RES).add_noise(nchw(x), nchw(noise), torch.from_numpy(levels)))
    ours = upscale_condition(x, noise, levels, scheduler_from_config({"_class_name": "DDPMScheduler", **LOW_RES})
                             .alphas_cumprod)
    assert max_err(ours, ref) <= 1e-6
    np.testing.assert_allclose(upscale_condition(x[:1], noise[:1], 20, jnp.linspace(1.0, 0.5, 400)),
                               upscale_condition(x[:1], noise[:1], jnp.array([20]), jnp.linspace(1.0, 0.5, 400)))


CASES = {   # scheduler, guidance, noise level, negative prompts (each case compiles one loop)
    "DDIM, guidance 9": ("DDIMScheduler", 9.0, 20, NEGATIVE),
    "Euler, guidance 5, noise 120": ("EulerDiscreteScheduler", 5.0, 120, None),
    "DPM-Solver++, no guidance, noise 0": ("DPMSolverMultistepScheduler", 1.0, 0, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_diffusers(folder, pipe, case, monkeypatch):
    sched, guidance, level, negative = CASES[case]
    image = low_res_images(10)
    latents = unit_noise(11, (len(PROMPTS), LOW, LOW, 4))
    image_noise = unit_noise(12, (len(PROMPTS), LOW, LOW, 3))
    ours = pipe(PROMPTS, image=image, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance,
                noise_level=level, latents=latents, image_noise=image_noise, scheduler=sched)
    assert ours.shape == (len(PROMPTS), LOW * FACTOR, LOW * FACTOR, 3)
    ref = diffusers_upscale(with_scheduler(folder[1], sched), monkeypatch, image_noise, prompt=PROMPTS,
                            image=nchw(image), negative_prompt=negative, num_inference_steps=STEPS,
                            guidance_scale=guidance, noise_level=level, latents=nchw(latents))
    check_images(ours, ref, f"upscale pipeline, {case}")
    # the conditioning matters: another noise level, or another low-res image, changes the result
    other = pipe(PROMPTS, image=image, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance,
                 noise_level=level + 100, latents=latents, image_noise=image_noise, scheduler=sched)
    assert max_err(other, ours) > 1e-2
    flipped = pipe(PROMPTS, image=image[::-1], negative_prompt=negative, num_inference_steps=STEPS,
                   guidance_scale=guidance, noise_level=level, latents=latents, image_noise=image_noise, scheduler=sched)
    assert max_err(flipped, ours) > 1e-2


def test_second_call_does_not_recompile(pipe):
    """New prompts, images, noise level and seed reuse every compiled stage (DDIM case above)."""
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=9.0, scheduler="DDIMScheduler")
    pipe(PROMPTS, low_res_images(20), NEGATIVE, noise_level=5, seed=1, **kwargs)
    before = pipe.trace_counts()
    out = pipe(["a green square", "a red triangle"], low_res_images(21), noise_level=300, seed=2, **kwargs)
    assert pipe.trace_counts() == before
    assert out.shape == (2, LOW * FACTOR, LOW * FACTOR, 3) and 0 <= out.min() and out.max() <= 1
    latents = pipe(PROMPTS, (low_res_images(22) * 255).astype(np.uint8), output_type="latent", **kwargs)
    assert latents.shape == (2, LOW, LOW, 4)


def test_in_memory_pipeline(folder, pipe, caplog):
    """Built from loaded parts (as a training run would): the same images; a VAE with another
    scaling_factor is set to diffusers' 0.08333 with a warning."""
    path = folder[0]
    parts = {name: jaxgen.load_pretrained(os.path.join(path, name)) for name in ("unet", "vae", "text_encoder")}
    params = {name: p for name, (_, p) in parts.items()}
    low_res = scheduler_from_config({"_class_name": "DDPMScheduler", **LOW_RES})
    main = scheduler_from_config(os.path.join(path, "scheduler"))
    tokenizer = jaxgen.load_tokenizer(os.path.join(path, "tokenizer"))
    with caplog.at_level(logging.WARNING, logger="jaxgen.pipelines.upscale"):
        mem = jaxgen.StableDiffusionUpscalePipeline(parts["unet"][0], parts["vae"][0].clone(scaling_factor=0.18215),
                                                    parts["text_encoder"][0], params, tokenizer, main, low_res, 350)
    assert "0.08333" in caplog.text and mem.vae.scaling_factor == UPSCALER_SCALING_FACTOR
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=9.0, noise_level=20, seed=3)
    np.testing.assert_allclose(mem(PROMPTS, low_res_images(30), NEGATIVE, **kwargs),
                               pipe(PROMPTS, low_res_images(30), NEGATIVE, **kwargs), atol=1e-6)


def test_errors(folder, pipe, tmp_path):
    image = low_res_images(40)
    with pytest.raises(DataError, match="image="):
        pipe(PROMPTS)
    with pytest.raises(DataError, match=r"\[N, H, W, 3\]"):
        pipe(PROMPTS, image[..., 0])                              # rank 3, not RGB
    with pytest.raises(DataError, match=r"\[N, H, W, 3\]"):
        pipe(PROMPTS, np.concatenate([image, image[..., :1]], -1))    # 4 channels
    with pytest.raises(DataError, match="one image per prompt"):
        pipe(PROMPTS, image[:1])
    with pytest.raises(DataError, match="multiple of 4"):
        pipe(PROMPTS, image[:, :6, :6])
    with pytest.raises(ValueError, match="max_noise_level=350"):
        pipe(PROMPTS, image, noise_level=351)
    with pytest.raises(ValueError, match="negative"):
        pipe(PROMPTS, image, noise_level=-1)
    with pytest.raises(TypeError, match="int"):
        pipe(PROMPTS, image, noise_level=2.5)
    with pytest.raises(DataError, match="image_noise has shape"):
        pipe(PROMPTS, image, image_noise=np.zeros((2, LOW, LOW, 4), np.float32))
    with pytest.raises(ConfigError, match="image-to-image"):
        pipe.img2img(PROMPTS, image)
    args = (pipe.vae, pipe.text_encoder, pipe.params, pipe.tokenizer, pipe.scheduler)
    with pytest.raises(ConfigError, match="4 latent channels \\+ 3"):
        jaxgen.StableDiffusionUpscalePipeline(pipe.unet.clone(in_channels=4), *args, pipe.low_res_scheduler)
    with pytest.raises(ConfigError, match="num_class_embeds"):
        jaxgen.StableDiffusionUpscalePipeline(pipe.unet, *args, pipe.low_res_scheduler, 400)
    with pytest.raises(ConfigError, match="low_res_scheduler is a EulerDiscreteScheduler"):
        jaxgen.StableDiffusionUpscalePipeline(pipe.unet, *args, pipe.get_scheduler("EulerDiscreteScheduler"))
    # a folder without its low-res scheduler
    broken = tmp_path / "broken"
    shutil.copytree(folder[0], broken)
    index = json.load(open(broken / "model_index.json"))
    json.dump({k: v for k, v in index.items() if k != "low_res_scheduler"}, open(broken / "model_index.json", "w"))
    with pytest.raises(ConfigError, match="low_res_scheduler"):
        jaxgen.StableDiffusionUpscalePipeline.from_pretrained(broken)
