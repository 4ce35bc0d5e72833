"""Stable Diffusion pipelines against diffusers: text-to-image (DDIM, Euler, DPM-Solver++, LMS),
image-to-image, inpainting (9-channel U-Net and mask blending with a 4-channel one).

Tiny random diffusers pipelines (every weight randomised) are saved by diffusers'
``save_pretrained``; jaxgen loads the folder; both get the same prompts, negative prompts and
noise. Text-to-image passes diffusers the latents directly; image-to-image and inpainting draw
their noise from the generator inside diffusers (VAE posterior sample, noise added to the image
latents), so the test replaces diffusers' ``randn_tensor`` with a feed that hands out the arrays
jaxgen receives as ``noise=`` / ``image_noise=`` / ``masked_image_noise=``, in diffusers' order.
Images: 16x16, VAE factor 2 (latents 8x8x4), 8 steps, guidance 7.5; each pipeline shape compiles
once (the persistent compilation cache of conftest.py shares programs with the subprocesses).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jaxgen  # noqa: E402
from jaxgen.convert.testing import randomize_torch as randomize  # noqa: E402
from jaxgen.errors import ConfigError, DataError  # noqa: E402
from jaxgen.tokenizer import train_tokenizer  # noqa: E402
from helpers import check_images, max_err, nchw, unit_noise, xla_flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-3                 # max |ours - diffusers| over image pixels in [0, 1]
STEPS, SIZE, LATENT = 8, 16, 8
PROMPTS = ["a large red circle on the left", "a small blue square at the top"]
NEGATIVE = ["a green triangle", ""]
CAPTIONS = [f"a {s} {c} {k} {p}" for s in ("small", "large") for c in ("red", "green", "blue")
            for k in ("circle", "square", "triangle") for p in ("on the left", "at the top")]



def tiny_unet(in_channels: int, seed: int):
    """One level, no mid block: the pipeline's plumbing is under test here (the U-Net's own parity
    over deeper configs is in test_unet_parity.py), and this compiles in a third of the time."""
    return randomize(diffusers.UNet2DConditionModel(
        sample_size=LATENT, in_channels=in_channels, out_channels=4, block_out_channels=(8,),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=32, attention_head_dim=2,
        norm_num_groups=4, mid_block_type=None), seed)


class RandnFeed:
    """Stands in for diffusers' randn_tensor: hands out the given NCHW arrays in order."""

    def __init__(self, *arrays):
        self.queue = [nchw(a) for a in arrays]

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.queue, f"diffusers drew more noise than the test fed it (shape {tuple(shape)})"
        x = self.queue.pop(0)
        assert tuple(shape) == tuple(x.shape), (tuple(shape), tuple(x.shape))
        return x.to(dtype or torch.float32)


def feed_randn(monkeypatch, module, *arrays) -> RandnFeed:
    feed = RandnFeed(*arrays)
    monkeypatch.setattr(module, "randn_tensor", feed)
    monkeypatch.setattr(diffusers.models.autoencoders.vae, "randn_tensor", feed)
    return feed


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two diffusers folders sharing VAE, text encoder and tokenizer: 'sd' (4-channel U-Net,
    StableDiffusionPipeline) and 'inpaint' (9-channel U-Net, StableDiffusionInpaintPipeline);
    returns ({name: folder}, {name: diffusers pipeline})."""
    root = tmp_path_factory.mktemp("sd")
    tok = train_tokenizer(CAPTIONS * 2, 600, str(root / "tok"))
    pt_tok = transformers.CLIPTokenizer.from_pretrained(str(root / "tok"))
    text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)), 3)
    vae = randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=SIZE), 2)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    common = dict(vae=vae, text_encoder=text, tokenizer=pt_tok, scheduler=sched, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    pipes = {"sd": diffusers.StableDiffusionPipeline(unet=tiny_unet(4, 1), **common),
             "inpaint": diffusers.StableDiffusionInpaintPipeline(unet=tiny_unet(9, 4), **common)}
    paths, loaded = {}, {}
    for name, pipe in pipes.items():
        paths[name] = str(root / name)
        pipe.save_pretrained(paths[name])
        # the reference reads the folder back, as jaxgen does: the in-memory scheduler config
        # differs from the saved one (it remembers which fields were defaults)
        loaded[name] = type(pipe).from_pretrained(paths[name], safety_checker=None,
                                                  requires_safety_checker=False)
        loaded[name].set_progress_bar_config(disable=True)
    return paths, loaded


@pytest.fixture(scope="module")
def pipe(folders):
    return jaxgen.StableDiffusionPipeline.from_pretrained(folders[0]["sd"])


def with_scheduler(pt_pipe, name):
    """The diffusers pipeline (shared modules) with another scheduler built from its config."""
    cls = getattr(diffusers, name)
    out = type(pt_pipe)(**{**pt_pipe.components, "scheduler": cls.from_config(pt_pipe.scheduler.config)})
    out.set_progress_bar_config(disable=True)
    return out


# ---- text-to-image -----------------------------------------------------------------------------
TEXT_CASES = {   # scheduler -> extra options exercised with it (each case is one compile)
    "DDIMScheduler": {},
    "EulerDiscreteScheduler": {"guidance_rescale": 0.7},
    "DPMSolverMultistepScheduler": {},
    "LMSDiscreteScheduler": {"num_images_per_prompt": 2},
}


@pytest.mark.parametrize("name", list(TEXT_CASES))
def test_text_to_image_matches_diffusers(folders, pipe, name):
    extra = TEXT_CASES[name]
    per = extra.get("num_images_per_prompt", 1)
    latents = unit_noise(10, (len(PROMPTS) * per, LATENT, LATENT, 4))
    ours = pipe(PROMPTS, NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents,
                scheduler=name, **extra)
    ref_pipe = with_scheduler(folders[1]["sd"], name)
    ref = ref_pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                   height=SIZE, width=SIZE, latents=nchw(latents), output_type="np", **extra).images
    assert ours.shape == (len(PROMPTS) * per, SIZE, SIZE, 3)
    check_images(ours, ref, f"text-to-image {name} {extra}")


def test_second_call_does_not_recompile(pipe):
    """Same shapes, steps and scheduler: the cached program runs (new prompts, guidance, seed)."""
    pipe(PROMPTS, NEGATIVE, num_inference_steps=STEPS, scheduler="DDIMScheduler", seed=1)
    before = pipe.trace_counts()
    assert before["text"] >= 1 and before["loop"] >= 1 and before["decode"] >= 1
    images = pipe(["a green square", "a red triangle"], num_inference_steps=STEPS, guidance_scale=4.0,
                  scheduler="DDIMScheduler", seed=5)
    assert pipe.trace_counts() == before
    assert images.shape == (2, SIZE, SIZE, 3) and images.min() >= 0 and images.max() <= 1
    # another step count re-traces the loop only
    pipe(["a green square", "a red triangle"], num_inference_steps=STEPS - 1, scheduler="DDIMScheduler")
    after = pipe.trace_counts()
    assert {k: after[k] - before.get(k, 0) for k in after} == {**dict.fromkeys(after, 0), "loop": 1}


def test_bfloat16_pipeline(folders, pipe):
    """dtype=jnp.bfloat16: weights held and computed in bf16 (as diffusers' torch_dtype), images
    float32 and close to the float32 pipeline's; an unsupported dtype is a clear error."""
    import jax.numpy as jnp

    half = jaxgen.StableDiffusionPipeline.from_pretrained(folders[0]["sd"], dtype=jnp.bfloat16)
    assert half.unet.dtype == jnp.bfloat16 and half.vae.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree_util.tree_leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    latents = unit_noise(11, (len(PROMPTS), LATENT, LATENT, 4))
    kw = dict(num_inference_steps=STEPS, guidance_scale=7.5, latents=latents, scheduler="DDIMScheduler")
    ours, full = half(PROMPTS, NEGATIVE, **kw), pipe(PROMPTS, NEGATIVE, **kw)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    assert 0 < np.abs(ours - full).max() < 0.1 and np.abs(ours - full).mean() < 0.02
    with pytest.raises(ConfigError, match="dtype=.*float32"):
        jaxgen.StableDiffusionPipeline.from_pretrained(folders[0]["sd"], dtype=jnp.int8)


def test_text_encoder_attention_mask_from_config(folders, pipe, tmp_path):
    """text_encoder/config.json with use_attention_mask: true -> the padding mask reaches CLIP (as
    diffusers does); the images change and still equal diffusers'."""
    import shutil

    folder = tmp_path / "masked"
    shutil.copytree(folders[0]["sd"], folder)
    cfg_path = folder / "text_encoder" / "config.json"
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "use_attention_mask": True}, open(cfg_path, "w"))
    masked = jaxgen.StableDiffusionPipeline.from_pretrained(folder)
    assert masked.use_attention_mask and not pipe.use_attention_mask
    latents = unit_noise(10, (2, LATENT, LATENT, 4))
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5, latents=latents, scheduler="DDIMScheduler")
    ours = masked(PROMPTS, NEGATIVE, **kwargs)
    assert max_err(ours, pipe(PROMPTS, NEGATIVE, **kwargs)) > 1e-2     # the mask matters
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    assert ref_pipe.text_encoder.config.use_attention_mask
    ref = ref_pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                   height=SIZE, width=SIZE, latents=nchw(latents), output_type="np").images
    check_images(ours, ref, "text-to-image with the text encoder's attention mask")


class UNetCalls:
    """Records the batch size of every U-Net call the program traces (delegates the rest)."""

    def __init__(self, unet):
        self.unet, self.batches = unet, []

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def apply(self, variables, sample, *args, **kwargs):
        self.batches.append(sample.shape[0])
        return self.unet.apply(variables, sample, *args, **kwargs)


@pytest.fixture(scope="module")
def mesh_pipe(folders):
    """The same folder with a one-device mesh over the batch (and a U-Net call recorder)."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    p = jaxgen.StableDiffusionPipeline.from_pretrained(folders[0]["sd"], mesh=mesh)
    p.unet = UNetCalls(p.unet)
    return p


def test_no_guidance_one_pass_on_a_mesh(folders, mesh_pipe):
    """guidance_scale <= 1: one U-Net pass of batch B per step (no unconditional half); the batch
    is sharded over a 1-device mesh; the images equal diffusers'."""
    latents = unit_noise(11, (2, LATENT, LATENT, 4))
    ours = mesh_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, latents=latents,
                     scheduler="EulerDiscreteScheduler")
    assert mesh_pipe.unet.batches == [2]
    ref = with_scheduler(folders[1]["sd"], "EulerDiscreteScheduler")(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE,
        latents=nchw(latents), output_type="np").images
    check_images(ours, ref, "text-to-image, guidance 1, 1-device mesh")


MULTI_DEVICE = """
import sys
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
import jaxgen
assert jax.device_count() == 2, jax.devices()
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
pipe = jaxgen.StableDiffusionPipeline.from_pretrained(sys.argv[1], mesh=mesh)
images = pipe({prompts!r}, num_inference_steps={steps}, guidance_scale=1.0,
              latents=np.load(sys.argv[2]), scheduler="EulerDiscreteScheduler")
np.save(sys.argv[3], images)
"""


def test_batch_sharded_over_two_devices(folders, mesh_pipe, tmp_path):
    """Two forced host devices (a subprocess): the sharded batch gives the one-device images."""
    latents = unit_noise(11, (2, LATENT, LATENT, 4))
    np.save(tmp_path / "latents.npy", latents)
    one = mesh_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, latents=latents,
                    scheduler="EulerDiscreteScheduler")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
    env.pop("PYTEST_CURRENT_TEST", None)
    script = MULTI_DEVICE.format(prompts=PROMPTS, steps=STEPS)
    out = subprocess.run([sys.executable, "-c", script, folders[0]["sd"], str(tmp_path / "latents.npy"),
                          str(tmp_path / "two.npy")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    two = np.load(tmp_path / "two.npy")
    assert max_err(two, one) <= 1e-5


# ---- image-to-image and inpainting -------------------------------------------------------------
def test_img2img_matches_diffusers(folders, pipe, monkeypatch):
    """strength 0.6 of 8 steps: the loop starts at index 4 from add_noise(image latents); the VAE
    posterior draw and the added noise are fed to both."""
    name = "DPMSolverMultistepScheduler"
    image = np.random.default_rng(20).uniform(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    noise, image_noise = unit_noise(21, (2, LATENT, LATENT, 4)), unit_noise(22, (1, LATENT, LATENT, 4))
    ours = pipe.img2img(PROMPTS, image, strength=0.6, negative_prompt=NEGATIVE,
                        num_inference_steps=STEPS, guidance_scale=7.5, noise=noise,
                        image_noise=image_noise, scheduler=name)
    module = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img
    feed = feed_randn(monkeypatch, module, image_noise, noise)   # diffusers' order: encode, then noise
    ref_pipe = with_scheduler(diffusers.StableDiffusionImg2ImgPipeline(**folders[1]["sd"].components), name)
    ref = ref_pipe(PROMPTS, image=image, strength=0.6, negative_prompt=NEGATIVE,
                   num_inference_steps=STEPS, guidance_scale=7.5, output_type="np").images
    assert not feed.queue
    check_images(ours, ref, f"img2img {name}")


INPAINT_CASES = {   # folder, scheduler, strength
    "9-channel U-Net": ("inpaint", "LMSDiscreteScheduler", 1.0),
    "4-channel U-Net, blending": ("sd", "EulerDiscreteScheduler", 0.75),
}


@pytest.mark.parametrize("case", list(INPAINT_CASES))
def test_inpaint_matches_diffusers(folders, pipe, monkeypatch, case):
    kind, name, strength = INPAINT_CASES[case]
    rng = np.random.default_rng(30)
    image = rng.uniform(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    mask = np.zeros((1, SIZE, SIZE, 1), np.float32)
    mask[:, 3:12, 5:15] = rng.uniform(0.5, 1, (1, 9, 10, 1))   # a repaint box (>= 0.5: repaint)
    mask[:, 0, 0] = 0.4                                        # below 0.5: kept
    noise, image_noise, masked_noise = (unit_noise(31, (2, LATENT, LATENT, 4)),
                                        unit_noise(32, (1, LATENT, LATENT, 4)),
                                        unit_noise(33, (1, LATENT, LATENT, 4)))
    ours_pipe = pipe if kind == "sd" else jaxgen.StableDiffusionPipeline.from_pretrained(folders[0][kind])
    ours = ours_pipe.inpaint(PROMPTS, image, mask, strength=strength, negative_prompt=NEGATIVE,
                             num_inference_steps=STEPS, guidance_scale=7.5, noise=noise,
                             image_noise=image_noise, masked_image_noise=masked_noise, scheduler=name)
    # diffusers' draws: the image's posterior (4-channel U-Net or strength < 1), the latent
    # noise, the masked image's posterior
    draws = ([image_noise] if kind == "sd" or strength < 1 else []) + [noise, masked_noise]
    module = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint
    feed = feed_randn(monkeypatch, module, *draws)
    ref_pipe = with_scheduler(diffusers.StableDiffusionInpaintPipeline(**folders[1][kind].components), name)
    ref = ref_pipe(PROMPTS, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                   height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
                   output_type="np").images
    assert not feed.queue
    check_images(ours, ref, f"inpaint {case} {name} strength {strength}")
    if kind == "sd":   # the kept region is the image itself, up to the VAE round trip
        assert ours.shape == (2, SIZE, SIZE, 3)


# ---- errors (no compilation) -------------------------------------------------------------------
def test_clear_errors(pipe, folders, tmp_path):
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("a circle", height=15, width=16)
    with pytest.raises(DataError, match=r"needs \(2, 8, 8, 4\)"):
        pipe(PROMPTS, latents=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="negative prompts"):
        pipe(PROMPTS, negative_prompt=["x", "y", "z"])
    with pytest.raises(ValueError, match="DDIMScheduler only"):
        pipe("a circle", eta=0.5, scheduler="EulerDiscreteScheduler")
    with pytest.raises(ConfigError, match="not implemented"):
        pipe("a circle", scheduler="KDPM2DiscreteScheduler")
    with pytest.raises(TypeError, match="jaxgen Scheduler"):
        pipe("a circle", scheduler=diffusers.DDIMScheduler())
    image = np.full((1, SIZE, SIZE, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match="strength"):
        pipe.img2img("a circle", image, strength=1.5)
    with pytest.raises(ValueError, match="leaves no step"):
        pipe.img2img("a circle", image, strength=0.1, num_inference_steps=5)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        pipe.img2img("a circle", image * 2 - 1.5)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe.img2img("a circle", np.zeros((1, 15, 16, 3), np.float32))
    with pytest.raises(DataError, match="same size"):
        pipe.inpaint("a circle", image, np.ones((1, 8, 8), np.float32))
    with pytest.raises(DataError, match="one per prompt"):
        pipe.img2img(["a", "b"], np.zeros((3, SIZE, SIZE, 3), np.float32))
    # a folder with a component this pipeline does not run
    index = json.load(open(os.path.join(folders[0]["sd"], "model_index.json")))
    bad = tmp_path / "bad"
    bad.mkdir()
    json.dump({**index, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
              open(bad / "model_index.json", "w"))
    with pytest.raises(ConfigError, match="text_encoder_2"):
        jaxgen.StableDiffusionPipeline.from_pretrained(bad)


def test_entry_point_classes(folders):
    from jaxgen.pipelines import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    for cls in (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline):
        p = cls.from_pretrained(folders[0]["sd"])
        assert isinstance(p, jaxgen.StableDiffusionPipeline) and p.vae_scale_factor == 2
        assert hasattr(p, "text2img")


# ---- train.sample on a diffusers folder --------------------------------------------------------
def test_train_sample_reads_a_diffusers_folder(folders, pipe, tmp_path):
    """``python -m train.sample --workdir FOLDER`` (its main, in this process: the compiled
    programs of the pipeline above are reused) writes the pipeline's images as uint8."""
    from absl import flags

    import train.sample as cli

    out = tmp_path / "s.npz"
    argv = ["train.sample", f"--workdir={folders[0]['sd']}", f"--out={out}", "--num=2", f"--steps={STEPS}",
            "--guidance=7.5", "--scheduler=DDIMScheduler", "--seed=3", f"--prompt={PROMPTS[0]}",
            f"--prompt={PROMPTS[1]}"]
    flags.FLAGS(argv)
    try:
        cli.main(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()
    saved = np.load(out)
    expected = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, seed=3, scheduler="DDIMScheduler")
    assert saved["images"].dtype == np.uint8 and saved["images"].shape == (2, SIZE, SIZE, 3)
    assert np.max(np.abs(saved["images"].astype(int) - np.round(expected * 255).astype(int))) <= 1
    assert list(saved["prompts"]) == PROMPTS
