"""UNet3DConditionModel and TextToVideoSDPipeline against diffusers.

Model: for each small config diffusers builds a UNet3DConditionModel, every weight is randomised
(the zero-initialised temporal convolutions included), save_pretrained writes a folder,
jaxgen.load_pretrained reads it and must give diffusers' output (relative error <= 1e-5,
float32); then jaxgen.save_pretrained writes perturbed weights and diffusers' from_pretrained
must give jaxgen's output.

Pipeline: a tiny random diffusers TextToVideoSDPipeline (16x16 pixels, VAE factor 2, 3 frames,
3 steps, two prompts with negatives, guidance 9) saved by diffusers; both get the same latents
(diffusers' [B, C, F, h, w] = ours [B, F, h, w, C] moved); frames must agree to 1e-3.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jaxgen  # noqa: E402
from jaxgen.convert.testing import randomize_torch  # noqa: E402
from jaxgen.errors import ConfigError, DataError  # noqa: E402
from jaxgen.nn.unet3d import UNet3DConditionModel  # noqa: E402
from jaxgen.nn.vae import AutoencoderKL  # noqa: E402
from helpers import check_images, max_err, perturbed, rel_err, tiny_sd_components, unit_noise  # noqa: E402

TOL = 1e-5


def ncfhw(x):
    """[B, F, H, W, C] numpy -> torch [B, C, F, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def bfhwc(t) -> np.ndarray:
    """torch [B, C, F, H, W] -> numpy [B, F, H, W, C]."""
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


# ---- the model ----------------------------------------------------------------------------------
CONFIGS = {
    # two levels, head size 4 (2 and 4 heads), 3 frames, a batch of 2 at different timesteps, 5x5
    # latents (not a multiple of 2: the up path upsamples to the skip size, as diffusers does)
    "two_levels": dict(cfg=dict(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1,
                                norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4),
                       batch=2, frames=3, size=5),
    # one level of plain blocks with two layers (three on the way up), head size 2 (4 heads in the
    # mid block, 8 in transformer_in), 4 frames, GELU, a guidance embedding (time_cond_proj_dim),
    # mid-block output scaling, 3 -> 2 channels
    "one_level": dict(cfg=dict(in_channels=3, out_channels=2, block_out_channels=(8,),
                               down_block_types=("DownBlock3D",), up_block_types=("UpBlock3D",),
                               layers_per_block=2, norm_num_groups=2,
                               cross_attention_dim=6, attention_head_dim=2, act_fn="gelu", time_cond_proj_dim=5,
                               mid_block_scale_factor=1.5),
                      batch=1, frames=4, size=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet3d_parity_both_directions(name, tmp_path):
    spec = CONFIGS[name]
    cfg = spec["cfg"]
    b, f, s = spec["batch"], spec["frames"], spec["size"]
    rng = np.random.default_rng(3)
    pt = randomize_torch(diffusers.UNet3DConditionModel(**cfg), seed=4)
    pt.save_pretrained(tmp_path / "pt")
    module, params = jaxgen.load_pretrained(tmp_path / "pt")
    assert isinstance(module, UNet3DConditionModel)
    x = rng.standard_normal((b, f, s, s, cfg.get("in_channels", 4))).astype(np.float32)
    ctx = rng.standard_normal((b, 5, cfg["cross_attention_dim"])).astype(np.float32)
    t = np.array([3.5, 780.0][:b], np.float32)
    kw = {}
    if cfg.get("time_cond_proj_dim"):
        kw["timestep_cond"] = rng.standard_normal((b, cfg["time_cond_proj_dim"])).astype(np.float32)
    kw_pt = {k: torch.from_numpy(v) for k, v in kw.items()}

    def reference(net):
        with torch.no_grad():
            return bfhwc(net(ncfhw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw_pt).sample)

    fwd = jax.jit(lambda p: module.apply({"params": p}, x, t, ctx, **kw))
    ref = reference(pt)
    ours = fwd(params)
    assert ours.shape == (b, f, s, s, cfg.get("out_channels", 4))
    err = rel_err(ours, ref)
    assert err <= TOL, f"{name}: diffusers -> jaxgen rel. error {err:.2e}"

    new = perturbed(params, 5)
    jaxgen.save_pretrained(module, new, tmp_path / "jx")
    saved = json.load(open(tmp_path / "jx" / "config.json"))
    assert saved["_class_name"] == "UNet3DConditionModel"
    for k, v in cfg.items():
        assert saved[k] == (list(v) if isinstance(v, tuple) else v), k
    pt2 = diffusers.UNet3DConditionModel.from_pretrained(tmp_path / "jx").eval()
    ref2 = reference(pt2)
    err2 = rel_err(fwd(new), ref2)
    assert err2 <= TOL, f"{name}: jaxgen -> diffusers rel. error {err2:.2e}"
    assert rel_err(ref2, ref) > 1e-3                       # the new weights really are new
    print(f"UNet3DConditionModel[{name}]: diffusers->jaxgen {err:.2e} (max abs {max_err(ours, ref):.1e}), "
          f"jaxgen->diffusers {err2:.2e}")


def test_unet3d_input_and_config_errors():
    m = UNet3DConditionModel(block_out_channels=(4,), down_block_types=("DownBlock3D",), up_block_types=("UpBlock3D",),
                             layers_per_block=1, norm_num_groups=2, cross_attention_dim=4, attention_head_dim=2)
    args, _ = m.dummy_inputs()
    variables = jax.eval_shape(lambda: m.init(jax.random.key(0), *args))
    sample, t, ctx = args
    with pytest.raises(DataError, match=r"\[B, F, H, W, 4\]"):          # an image batch, not a video
        jax.eval_shape(lambda v: m.apply(v, sample[:, 0], t, ctx), variables)
    with pytest.raises(DataError, match="encoder_hidden_states"):        # one context per frame
        jax.eval_shape(lambda v: m.apply(v, jnp.zeros((2, 3, 1, 1, 4)), t, jnp.zeros((6, 1, 4))), variables)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        UNet3DConditionModel.from_pt_config({"num_attention_heads": 8})
    with pytest.raises(ConfigError, match="down_block_types"):
        UNet3DConditionModel.from_pt_config({"down_block_types": ["CrossAttnDownBlock2D"]})


# ---- the pipeline -------------------------------------------------------------------------------
STEPS, SIZE, LATENT, FRAMES = 3, 16, 8, 3
PROMPTS = ["a large red circle on the left", "a small blue square at the top"]
NEGATIVE = ["a green triangle", ""]
UNET = dict(sample_size=LATENT, block_out_channels=(8,), down_block_types=("CrossAttnDownBlock3D",),
            up_block_types=("CrossAttnUpBlock3D",), layers_per_block=1, norm_num_groups=4,
            cross_attention_dim=32, attention_head_dim=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A diffusers TextToVideoSDPipeline folder (one-level U-Net: its loop compiles fast) and the
    diffusers pipeline read back from it."""
    root = tmp_path_factory.mktemp("t2v")
    parts = tiny_sd_components(root, SIZE)
    parts = {k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")}
    unet = randomize_torch(diffusers.UNet3DConditionModel(**UNET), 1)
    diffusers.TextToVideoSDPipeline(unet=unet, **parts).save_pretrained(root / "pipe")
    ref = diffusers.TextToVideoSDPipeline.from_pretrained(root / "pipe")
    ref.set_progress_bar_config(disable=True)
    return str(root / "pipe"), ref


@pytest.fixture(scope="module")
def pipe(folder):
    return jaxgen.TextToVideoSDPipeline.from_pretrained(folder[0])


@pytest.mark.parametrize("sched", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_pipeline_matches_diffusers(folder, pipe, sched):
    latents = unit_noise(21, (len(PROMPTS), FRAMES, LATENT, LATENT, 4))
    before = pipe.trace_counts().get("loop", 0)
    ours = pipe(PROMPTS, NEGATIVE, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=9.0,
                latents=latents, scheduler=sched)
    assert pipe.trace_counts()["loop"] == before + 1               # the whole loop: one program
    ref_pipe = folder[1]
    cls = getattr(diffusers, sched)
    ref_pipe = diffusers.TextToVideoSDPipeline(**{**ref_pipe.components,
                                                  "scheduler": cls.from_config(ref_pipe.scheduler.config)})
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(PROMPTS, negative_prompt=NEGATIVE, num_frames=FRAMES, num_inference_steps=STEPS,
                   guidance_scale=9.0, latents=ncfhw(latents), output_type="np").frames
    assert ours.shape == (len(PROMPTS), FRAMES, SIZE, SIZE, 3)
    check_images(ours.reshape(-1, SIZE, SIZE, 3), np.asarray(ref).reshape(-1, SIZE, SIZE, 3),
                 f"TextToVideoSDPipeline, {sched}")


def test_second_call_and_in_memory_parts(pipe):
    """New prompts, seed and guidance scale with the same shapes reuse every compiled stage; a
    pipeline assembled from parts in memory is the same pipeline."""
    kwargs = dict(num_frames=FRAMES, num_inference_steps=STEPS, scheduler="DDIMScheduler")
    first = pipe(PROMPTS, seed=1, guidance_scale=9.0, **kwargs)
    before = pipe.trace_counts()
    again = jaxgen.TextToVideoSDPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.params, pipe.tokenizer,
                                         pipe.scheduler, scheduler_config=pipe.scheduler_config)
    second = again(["a green square", "a red triangle"], seed=2, guidance_scale=5.0, **kwargs)
    same = again(PROMPTS, seed=1, guidance_scale=9.0, **kwargs)
    assert pipe.trace_counts() == before
    np.testing.assert_array_equal(same, first)
    assert second.shape == first.shape and 0 <= second.min() and second.max() <= 1 and max_err(second, first) > 1e-3


def test_pipeline_errors(pipe):
    latents = unit_noise(22, (len(PROMPTS), FRAMES, LATENT, LATENT, 4))
    with pytest.raises(DataError, match="num_frames=3"):                         # frames mismatch
        pipe(PROMPTS, latents=latents[:, :2], num_frames=FRAMES)
    with pytest.raises(DataError, match="permute"):                              # diffusers' layout
        pipe(PROMPTS, latents=latents.transpose(0, 4, 1, 2, 3), num_frames=FRAMES)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(PROMPTS, num_frames=FRAMES, height=15, width=16)
    with pytest.raises(ValueError, match="num_frames"):
        pipe(PROMPTS, num_frames=0)
    with pytest.raises(ValueError, match="negative prompts"):
        pipe(PROMPTS, ["one"], num_frames=FRAMES)
    with pytest.raises(ConfigError, match="UNet3DConditionModel"):
        jaxgen.TextToVideoSDPipeline(AutoencoderKL(), pipe.vae, pipe.text_encoder, pipe.params,
                                     pipe.tokenizer, pipe.scheduler)
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        jaxgen.TextToVideoSDPipeline(pipe.unet.clone(cross_attention_dim=16), pipe.vae, pipe.text_encoder,
                                     pipe.params, pipe.tokenizer, pipe.scheduler)
