"""StableDiffusionInstructPix2PixPipeline against diffusers.

A tiny random diffusers StableDiffusionInstructPix2PixPipeline (8-channel U-Net: 4 latent + 4
image-latent channels; 16x16 images, VAE factor 2, 6 steps) is saved by diffusers; jaxgen loads
the folder; both get the same prompts, images and latents and their images must agree to 1e-3
(max abs, images in [0, 1]) for DDIM, Euler and DPM-Solver++ with both guidance scales active,
and on the guidance-off path (image_guidance_scale < 1). Then: no retrace on a second call,
the in-memory constructor, the pure guidance pieces, and the bad-input errors.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import jaxgen  # noqa: E402
from jaxgen.convert.testing import randomize_torch  # noqa: E402
from jaxgen.errors import ConfigError, DataError  # noqa: E402
from jaxgen.pipelines.instruct_pix2pix import (guidance_active, ip2p_context, ip2p_guidance,  # noqa: E402
                                               ip2p_unet_input)
from helpers import check_images, max_err, nchw, tiny_sd_components, unit_noise  # noqa: E402

STEPS, SIZE, LATENT = 6, 16, 8
PROMPTS = ["make it blue", "turn the circle into a square"]
NEGATIVE = ["a green triangle", ""]
UNET = dict(sample_size=LATENT, in_channels=8, out_channels=4, block_out_channels=(16,), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"ip2p": an InstructPix2Pix folder, "sd": a plain text-to-image SD folder (4-channel U-Net)},
    and the diffusers InstructPix2Pix pipeline read back from its folder."""
    root = tmp_path_factory.mktemp("ip2p")
    common = tiny_sd_components(root, SIZE)
    unet = randomize_torch(diffusers.UNet2DConditionModel(**UNET), 1)
    paths = {"ip2p": str(root / "ip2p"), "sd": str(root / "sd")}
    diffusers.StableDiffusionInstructPix2PixPipeline(unet=unet, **common).save_pretrained(paths["ip2p"])
    unet4 = randomize_torch(diffusers.UNet2DConditionModel(**{**UNET, "in_channels": 4}), 3)
    diffusers.StableDiffusionPipeline(unet=unet4, **common).save_pretrained(paths["sd"])
    ref = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
        paths["ip2p"], safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return paths, ref


@pytest.fixture(scope="module")
def pipe(folders):
    return jaxgen.StableDiffusionInstructPix2PixPipeline.from_pretrained(folders[0]["ip2p"])


def edit_images(seed, n=1):
    """Blocky random RGB images [n, SIZE, SIZE, 3] in [0, 1] (4x4-pixel cells)."""
    cells = np.random.default_rng(seed).uniform(0, 1, (n, SIZE // 4, SIZE // 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(cells, 4, axis=1), 4, axis=2)


def with_scheduler(pt_pipe, name, options):
    sched = getattr(diffusers, name).from_config(pt_pipe.scheduler.config, **options)
    out = type(pt_pipe)(**{**pt_pipe.components, "scheduler": sched})
    out.set_progress_bar_config(disable=True)
    return out


CASES = {   # scheduler, number of images, guidance_scale, image_guidance_scale, scheduler options
    "DDIM, one image for both prompts": ("DDIMScheduler", 1, 7.5, 1.5, {}),
    "Euler, one image per prompt": ("EulerDiscreteScheduler", 2, 5.0, 2.0, {}),
    "DPM-Solver++, one image per prompt": ("DPMSolverMultistepScheduler", 2, 7.5, 1.2,
                                           dict(algorithm_type="dpmsolver++")),
    "DDIM, guidance off (image_guidance_scale < 1)": ("DDIMScheduler", 1, 7.5, 0.8, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_diffusers(folders, pipe, case):
    sched, n_img, g, ig, options = CASES[case]
    images = edit_images(20 + n_img, n_img)
    latents = unit_noise(21, (len(PROMPTS), LATENT, LATENT, 4))
    scheduler = jaxgen.scheduler_from_config({**pipe.scheduler_config, **options}, class_name=sched)
    ref_pipe = with_scheduler(folders[1], sched, options)
    assert all(ref_pipe.scheduler.config[k] == v for k, v in options.items())
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=g, image_guidance_scale=ig, negative_prompt=NEGATIVE)
    warns = pytest.warns(UserWarning, match="switches all guidance off") if ig < 1 else contextlib.nullcontext()
    with warns:
        ours = pipe(PROMPTS, images, latents=latents, scheduler=scheduler, **kwargs)
        # the image conditions the result
        other = pipe(PROMPTS, edit_images(30, n_img), latents=latents, scheduler=scheduler, **kwargs)
    assert max_err(other, ours) > 1e-2
    ref = ref_pipe(PROMPTS, image=nchw(images), latents=nchw(latents), output_type="np", **kwargs).images
    check_images(ours, ref, f"InstructPix2Pix, {case}")


def test_second_call_does_not_retrace_and_init_from_parts(pipe):
    """Same shapes, scheduler and guidance switch: new prompts, image, guidance values and seed
    reuse every compiled stage; a pipeline built from in-memory parts gives the same images."""
    kwargs = dict(num_inference_steps=STEPS, scheduler="DDIMScheduler")
    pipe(PROMPTS, edit_images(40), negative_prompt=NEGATIVE, guidance_scale=7.5, image_guidance_scale=1.5, **kwargs)
    before = pipe.trace_counts()
    assert before["ip2p_loop"] >= 1 and before["ip2p_image"] >= 1
    out = pipe(["make it red", "add a square"], edit_images(41), guidance_scale=3.0, image_guidance_scale=1.1,
               seed=3, **kwargs)
    assert pipe.trace_counts() == before
    assert out.shape == (2, SIZE, SIZE, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    built = jaxgen.StableDiffusionInstructPix2PixPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.params,
                                                         pipe.tokenizer, pipe.scheduler,
                                                         scheduler_config=pipe.scheduler_config)
    again = built(["make it red", "add a square"], edit_images(41), guidance_scale=3.0, image_guidance_scale=1.1,
                  seed=3, **kwargs)
    np.testing.assert_array_equal(again, out)
    assert pipe.trace_counts() == before


def test_guidance_pieces():
    rng = np.random.default_rng(5)
    text, image, uncond = (jnp.asarray(rng.standard_normal((2, 3, 3, 4)), jnp.float32) for _ in range(3))
    both = jnp.concatenate([text, image, uncond], axis=0)
    # g = ig = 1 gives the text prediction; ig only: the image prediction's pull
    np.testing.assert_allclose(ip2p_guidance(both, 1.0, 1.0), text, atol=1e-6)
    np.testing.assert_allclose(ip2p_guidance(both, 2.0, 3.0),
                               uncond + 2.0 * (text - image) + 3.0 * (image - uncond), atol=1e-6)
    x_in, lat = jnp.ones((2, 3, 3, 4)), jnp.full((2, 3, 3, 4), 2.0)
    model_in = ip2p_unet_input(x_in, lat, True)
    assert model_in.shape == (6, 3, 3, 8)
    np.testing.assert_array_equal(model_in[:, ..., :4], 1.0)
    np.testing.assert_array_equal(model_in[:4, ..., 4:], 2.0)
    np.testing.assert_array_equal(model_in[4:, ..., 4:], 0.0)
    assert ip2p_unet_input(x_in, lat, False).shape == (2, 3, 3, 8)
    ctx = ip2p_context(jnp.ones((2, 5, 7)), jnp.zeros((2, 5, 7)), True)
    assert ctx.shape == (6, 5, 7) and float(ctx[:2].min()) == 1 and float(ctx[2:].max()) == 0
    assert guidance_active(7.5, 1.0) and not guidance_active(7.5, 0.99) and not guidance_active(1.0, 1.5)


def test_errors(folders, pipe):
    image = edit_images(50)
    with pytest.raises(ConfigError, match="text-to-image U-Net: load it with jaxgen.StableDiffusionPipeline"):
        jaxgen.StableDiffusionInstructPix2PixPipeline.from_pretrained(folders[0]["sd"])
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(PROMPTS, image[:, :15])
    with pytest.raises(TypeError, match="non-empty list"):
        pipe([], image)
    with pytest.raises(DataError, match="one image for all, one per prompt"):
        pipe(PROMPTS, edit_images(51, 3))
    with pytest.raises(DataError, match="image="):
        pipe(PROMPTS)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        pipe(PROMPTS, image * 2 - 1)
    with pytest.raises(DataError, match="latents has shape"):
        pipe(PROMPTS, image, latents=np.zeros((2, 4, LATENT, LATENT), np.float32))
    with pytest.raises(ConfigError, match="finite"):
        pipe(PROMPTS, image, image_guidance_scale=float("nan"))
    with pytest.raises(ConfigError, match="cannot run image-to-image"):
        pipe.img2img(PROMPTS, image)
