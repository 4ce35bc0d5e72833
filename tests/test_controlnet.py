"""ControlNetModel and StableDiffusionControlNetPipeline against diffusers.

Model: for each small config diffusers builds a ControlNetModel, every weight (zero convolutions
included) is randomised, save_pretrained writes a folder, jaxgen.load_pretrained reads it and
must give diffusers' residuals (relative error <= 1e-5 per residual, float32); then
jaxgen.save_pretrained writes new weights and diffusers' from_pretrained must give jaxgen's.
``controlnet_from_unet`` is compared with diffusers' ``ControlNetModel.from_unet``.

Pipeline: a tiny random diffusers StableDiffusionControlNetPipeline (16x16 images, VAE factor 2,
8 steps, two ControlNets for the multi case) saved by diffusers; both get the same prompts,
control images and latents; images must agree to 1e-3.
"""
from __future__ import annotations

import json
import os

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
from jaxgen.nn.controlnet import ControlNetModel, controlnet_from_unet  # noqa: E402
from jaxgen.pipelines.controlnet import controlnet_keep  # noqa: E402
from helpers import check_images, max_err, nchw, nhwc, perturbed, rel_err, tiny_sd_components, unit_noise  # noqa: E402

TOL = 1e-5

# ---- ControlNetModel configs --------------------------------------------------------------------
CONFIGS = {
    # SD 1.x-like: conv projections, 2 heads, a cross-attention mid block; 2-step conditioning
    # embedding (factor 2); plain and guess-mode scaling
    "sd1": dict(cfg=dict(in_channels=4, block_out_channels=(16, 32),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1,
                         norm_num_groups=8, cross_attention_dim=12, attention_head_dim=2,
                         conditioning_embedding_out_channels=(8, 16)),
                size=8, ctx=(5, 12), modes=((False, 0.7), (True, 1.3))),
    # SD 2.x-like: linear projections, per-block heads (2, 4), two transformer layers, upcast, no
    # sin/cos flip and freq_shift 1, scale_shift resnets, a timestep class embedding; a 1-channel
    # BGR-declared control at factor 4 (3-step embedding), global pooling of the residuals
    "sd2_pool": dict(cfg=dict(in_channels=4, block_out_channels=(16, 32),
                              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                              layers_per_block=2, norm_num_groups=8, cross_attention_dim=16,
                              attention_head_dim=(2, 4), transformer_layers_per_block=2,
                              use_linear_projection=True, upcast_attention=True, flip_sin_to_cos=False,
                              freq_shift=1, resnet_time_scale_shift="scale_shift", class_embed_type="timestep",
                              conditioning_channels=1, controlnet_conditioning_channel_order="bgr",
                              conditioning_embedding_out_channels=(4, 8, 16), global_pool_conditions=True),
                     size=4, ctx=(6, 16), labels="timestep", modes=((True, 0.9),)),
    # SDXL-like: text_time added embedding, class labels, only_cross_attention in the first block,
    # a mid block without attention, three levels, BGR 3-channel control at factor 1, GELU
    "xl_bgr": dict(cfg=dict(in_channels=3, block_out_channels=(8, 16, 16),
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                            layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=1,
                            only_cross_attention=(True, False, False), mid_block_type="UNetMidBlock2D",
                            addition_embed_type="text_time", addition_time_embed_dim=4,
                            projection_class_embeddings_input_dim=4 * 2 + 6, num_class_embeds=3, act_fn="gelu",
                            controlnet_conditioning_channel_order="bgr",
                            conditioning_embedding_out_channels=(8,)),
                   size=8, ctx=(3, 8), labels="int", text_time=(6, 2), modes=((False, 1.0),)),
}


def _model_inputs(spec, cfg, rng):
    size = spec["size"]
    factor = 2 ** (len(cfg["conditioning_embedding_out_channels"]) - 1)
    x = rng.standard_normal((2, size, size, cfg["in_channels"])).astype(np.float32)
    cond = rng.uniform(0, 1, (2, size * factor, size * factor, cfg.get("conditioning_channels", 3)))
    ctx = rng.standard_normal((2, *spec["ctx"])).astype(np.float32)
    t = np.array([3.5, 780.0], np.float32)
    kw_np = {}
    if spec.get("labels") == "int":
        kw_np["class_labels"] = np.array([2, 0], np.int64)
    elif spec.get("labels") == "timestep":
        kw_np["class_labels"] = np.array([10.0, 400.0], np.float32)
    if spec.get("text_time"):
        d, k = spec["text_time"]
        kw_np["added_cond_kwargs"] = {"text_embeds": rng.standard_normal((2, d)).astype(np.float32),
                                      "time_ids": rng.uniform(0, 64, (2, k)).astype(np.float32)}
    kw_pt = {k: ({k2: torch.from_numpy(v2) for k2, v2 in v.items()} if isinstance(v, dict) else torch.from_numpy(v))
             for k, v in kw_np.items()}
    return x, cond.astype(np.float32), ctx, t, kw_np, kw_pt


def _torch_residuals(pt, x, cond, ctx, t, kw_pt, scale, guess):
    with torch.no_grad():
        out = pt(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond), conditioning_scale=scale,
                 guess_mode=guess, **kw_pt)
    return [nhwc(d) for d in out.down_block_res_samples], nhwc(out.mid_block_res_sample)


def _errors(ours, ref) -> list[float]:
    down, mid = ours
    ref_down, ref_mid = ref
    assert len(down) == len(ref_down)
    return [rel_err(a, b) for a, b in zip(down, ref_down)] + [rel_err(mid, ref_mid)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_controlnet_parity_both_directions(name, tmp_path_factory):
    spec = CONFIGS[name]
    cfg = spec["cfg"]
    rng = np.random.default_rng(7)
    pt = randomize_torch(diffusers.ControlNetModel(**cfg), seed=8)
    folder = str(tmp_path_factory.mktemp(f"cn_{name}_pt"))
    pt.save_pretrained(folder)
    module, params = jaxgen.load_pretrained(folder)
    assert isinstance(module, ControlNetModel)
    x, cond, ctx, t, kw_np, kw_pt = _model_inputs(spec, cfg, rng)
    kw_j = jax.tree_util.tree_map(jnp.asarray, kw_np)
    fwd = jax.jit(lambda p, scale, kw, guess: module.apply({"params": p}, x, t, ctx, cond, scale, guess, **kw),
                  static_argnums=3)
    new = perturbed(params, 9)
    out_folder = str(tmp_path_factory.mktemp(f"cn_{name}_jx"))
    jaxgen.save_pretrained(module, new, out_folder)
    saved = json.load(open(os.path.join(out_folder, "config.json")))
    for k, v in cfg.items():
        assert saved[k] == (list(v) if isinstance(v, tuple) else v), k
    pt2 = diffusers.ControlNetModel.from_pretrained(out_folder).eval()
    for guess, scale in spec["modes"]:
        ref = _torch_residuals(pt, x, cond, ctx, t, kw_pt, scale, guess)
        ours = fwd(params, jnp.float32(scale), kw_j, guess)
        assert [d.shape for d in ours.down_block_res_samples] == [d.shape for d in ref[0]]
        err = max(_errors(ours, ref))
        assert err <= TOL, f"{name} guess_mode={guess}: diffusers -> jaxgen rel. error {err:.2e}"
        ref2 = _torch_residuals(pt2, x, cond, ctx, t, kw_pt, scale, guess)
        err2 = max(_errors(fwd(new, jnp.float32(scale), kw_j, guess), ref2))
        assert err2 <= TOL, f"{name} guess_mode={guess}: jaxgen -> diffusers rel. error {err2:.2e}"
        assert rel_err(ref2[1], ref[1]) > 1e-4      # the new weights really are new
        print(f"ControlNetModel[{name}] guess_mode={guess} scale={scale}: diffusers->jaxgen {err:.2e}, "
              f"jaxgen->diffusers {err2:.2e}")


def test_from_unet_matches_diffusers(tmp_path):
    """controlnet_from_unet == diffusers' ControlNetModel.from_unet: the config, the U-Net's
    encoder weights, zero convolutions and conditioning conv_out; the conditioning embedding's
    first convolutions are fresh draws of PyTorch's default initialisation (within its bounds)."""
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
               cross_attention_dim=12, attention_head_dim=2, num_class_embeds=4)
    pt_unet = randomize_torch(diffusers.UNet2DConditionModel(**cfg), seed=11)
    pt_unet.save_pretrained(tmp_path / "unet")
    unet, unet_params = jaxgen.load_pretrained(tmp_path / "unet")
    cemb = (8, 16)
    module, params = controlnet_from_unet(unet, unet_params, conditioning_embedding_out_channels=cemb)
    ref = diffusers.ControlNetModel.from_unet(pt_unet, conditioning_embedding_out_channels=cemb)

    jaxgen.save_pretrained(module, params, tmp_path / "cn")
    loaded = diffusers.ControlNetModel.from_pretrained(tmp_path / "cn")   # strict: every key fits
    for k, v in ref.config.items():
        if not k.startswith("_"):
            want = list(v) if isinstance(v, tuple) else v
            got = loaded.config[k]
            assert (list(got) if isinstance(got, tuple) else got) == want, k
    ours = module.state_dict_from_params(params)
    theirs = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert set(ours) == set(theirs)
    fresh = [k for k in theirs if k.startswith("controlnet_cond_embedding.") and "conv_out" not in k]
    assert len(fresh) == 2 * (1 + 2 * (len(cemb) - 1))
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        if k in fresh:
            fan_in = np.prod(ours[k.replace(".bias", ".weight")].shape[1:])
            assert np.abs(ours[k]).max() <= 1 / np.sqrt(fan_in) and np.std(ours[k]) > 0, k
        else:
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    for k in ("controlnet_mid_block.weight", "controlnet_cond_embedding.conv_out.weight"):
        assert not np.any(ours[k]), k
    # a fresh ControlNet adds nothing; its residuals fit the U-Net's skips (checked by shapes)
    rng = np.random.default_rng(12)
    x, ctx = rng.standard_normal((1, 8, 8, 4)).astype(np.float32), rng.standard_normal((1, 3, 12)).astype(np.float32)
    labels = jnp.array([1])
    down, mid = jax.jit(lambda p: module.apply({"params": p}, x, 5, ctx, rng.uniform(0, 1, (1, 16, 16, 3)),
                                               class_labels=labels))(params)
    assert not any(np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
    with_res = jax.eval_shape(lambda p: unet.apply({"params": p}, x, 5, ctx, class_labels=labels,
                                                   down_block_additional_residuals=down,
                                                   mid_block_additional_residual=mid), unet_params)
    assert with_res.shape == x.shape
    with pytest.raises(DataError, match="3 down_block_additional_residuals for 4"):
        jax.eval_shape(lambda p: unet.apply({"params": p}, x, 5, ctx, class_labels=labels,
                                            down_block_additional_residuals=down[:3],
                                            mid_block_additional_residual=mid), unet_params)
    with pytest.raises(ConfigError, match="conv_in_kernel"):
        controlnet_from_unet(unet.clone(conv_in_kernel=5), unet_params)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="addition_embed_type"):
        ControlNetModel.from_pt_config({"addition_embed_type": "text"})
    with pytest.raises(ConfigError, match="encoder_hid_dim_type"):
        ControlNetModel.from_pt_config({"encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 8})
    with pytest.raises(ConfigError, match="mid_block_type"):
        ControlNetModel.from_pt_config({"mid_block_type": None})
    with pytest.raises(ConfigError, match="class_embed_type"):
        ControlNetModel.from_pt_config({"class_embed_type": "simple_projection"})
    with pytest.raises(ConfigError, match="controlnet_conditioning_channel_order"):
        ControlNetModel.from_pt_config({"controlnet_conditioning_channel_order": "rbg"})
    m = ControlNetModel(block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2, layers_per_block=1,
                        norm_num_groups=4, cross_attention_dim=4, conditioning_embedding_out_channels=(4, 4))
    args, _ = m.dummy_inputs()
    variables = jax.eval_shape(lambda: m.init(jax.random.key(0), *args))
    with pytest.raises(DataError, match=r"pixel size = latent size x 2"):
        jax.eval_shape(lambda v: m.apply(v, args[0], 1, args[2], jnp.zeros((1, 2, 2, 3))), variables)
    assert m.num_residuals() == len(jax.eval_shape(lambda v: m.apply(v, *args), variables).down_block_res_samples)


def test_controlnet_keep_is_diffusers_rule():
    keep = controlnet_keep(10, [0.0, 0.25], [0.6, 1.0])
    assert keep[:, 0].tolist() == [1] * 6 + [0] * 4
    assert keep[:, 1].tolist() == [0] * 3 + [1] * 7   # 2/10 < 0.25: off; 3/10 >= 0.25: on


# ---- the pipeline -------------------------------------------------------------------------------
STEPS, SIZE, LATENT = 8, 16, 8
PROMPTS = ["a large red circle on the left", "a small blue square at the top"]
NEGATIVE = ["a green triangle", ""]
UNET = dict(sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
CONTROLNET = {k: v for k, v in UNET.items() if k not in ("sample_size", "out_channels", "up_block_types")}


def tiny_controlnet(seed, scale=1.0):
    """A random ControlNet for UNET at the VAE's factor 2; zero convolutions scaled up (x scale) so
    the control visibly changes the images."""
    net = randomize_torch(diffusers.ControlNetModel(**CONTROLNET, conditioning_embedding_out_channels=(4, 8)), seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.mul_(scale)
    return net


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """'single': a StableDiffusionControlNetPipeline folder; 'multi': the same with a
    MultiControlNetModel of two ControlNets (controlnet/, controlnet_1/). Returns
    ({name: folder}, {name: the diffusers pipeline read back from it})."""
    root = tmp_path_factory.mktemp("sdcn")
    common = tiny_sd_components(root, SIZE)
    unet = randomize_torch(diffusers.UNet2DConditionModel(**UNET), 1)
    nets = [tiny_controlnet(5, 3.0), tiny_controlnet(6, 3.0)]
    pipes = {"single": diffusers.StableDiffusionControlNetPipeline(unet=unet, controlnet=nets[0], **common),
             "multi": diffusers.StableDiffusionControlNetPipeline(
                 unet=unet, controlnet=diffusers.MultiControlNetModel(nets), **common)}
    paths, loaded = {}, {}
    for name, pipe in pipes.items():
        paths[name] = str(root / name)
        pipe.save_pretrained(paths[name])
        loaded[name] = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
            paths[name], safety_checker=None, requires_safety_checker=False)
        loaded[name].set_progress_bar_config(disable=True)
    return paths, loaded


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: jaxgen.StableDiffusionControlNetPipeline.from_pretrained(f) for name, f in folders[0].items()}


def control_images(seed, n=1):
    """Blocky random RGB control images [n, SIZE, SIZE, 3] in [0, 1] (4x4-pixel cells)."""
    cells = np.random.default_rng(seed).uniform(0, 1, (n, SIZE // 4, SIZE // 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(cells, 4, axis=1), 4, axis=2)


def with_scheduler(pt_pipe, name):
    cls = getattr(diffusers, name)
    out = type(pt_pipe)(**{**pt_pipe.components, "scheduler": cls.from_config(pt_pipe.scheduler.config)})
    out.set_progress_bar_config(disable=True)
    return out


CASES = {   # folder, scheduler, guidance, options (each case compiles one loop)
    "DDIM, guidance": ("single", "DDIMScheduler", 7.5, dict(controlnet_conditioning_scale=0.8)),
    "Euler, guess mode, end 0.6": ("single", "EulerDiscreteScheduler", 5.0,
                                   dict(guess_mode=True, control_guidance_end=0.6)),
    "two ControlNets, DPM-Solver++": ("multi", "DPMSolverMultistepScheduler", 7.5,
                                      dict(controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.25],
                                           control_guidance_end=[1.0, 0.75])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_diffusers(folders, pipes, case):
    kind, sched, guidance, options = CASES[case]
    k = 2 if kind == "multi" else 1
    images = [control_images(40 + i, n=len(PROMPTS) if i == 0 else 1) for i in range(k)]
    image = images if k > 1 else images[0]
    latents = unit_noise(41, (len(PROMPTS), LATENT, LATENT, 4))
    ours = pipes[kind](PROMPTS, image, NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance,
                       latents=latents, scheduler=sched, **options)
    ref_pipe = with_scheduler(folders[1][kind], sched)
    pt_image = [nchw(im) for im in images] if k > 1 else nchw(images[0])
    ref = ref_pipe(PROMPTS, image=pt_image, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                   guidance_scale=guidance, latents=nchw(latents), output_type="np", **options).images
    check_images(ours, ref, f"ControlNet pipeline, {case}")
    # the control matters: without it (scale 0) the images differ
    off = pipes[kind](PROMPTS, image, NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance, latents=latents,
                      scheduler=sched, **{**options, "controlnet_conditioning_scale": 0.0})
    assert max_err(off, ours) > 1e-2


def test_second_call_does_not_recompile(pipes):
    """Same shapes, scheduler and switches: new prompts, control images, scales and start/end
    fractions reuse the compiled loop (the DDIM case above compiled it)."""
    pipe = pipes["single"]
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5, scheduler="DDIMScheduler")
    pipe(PROMPTS, control_images(50, 2), NEGATIVE, seed=1, **kwargs)
    before = pipe.trace_counts()
    out = pipe(["a green square", "a red triangle"], control_images(51, 1), seed=2, controlnet_conditioning_scale=1.4,
               control_guidance_start=0.2, control_guidance_end=0.9, **kwargs)
    assert pipe.trace_counts() == before
    assert out.shape == (2, SIZE, SIZE, 3) and 0 <= out.min() and out.max() <= 1


def test_loading_and_call_errors(folders, pipes, tmp_path):
    paths = folders[0]
    # controlnet= as a list of folders gives the multi pipeline's nets
    multi = jaxgen.StableDiffusionControlNetPipeline.from_pretrained(
        paths["single"], controlnet=[os.path.join(paths["multi"], "controlnet"),
                                     os.path.join(paths["multi"], "controlnet_1")])
    assert len(multi.controlnets) == 2 and len(pipes["multi"].controlnets) == 2
    np.testing.assert_array_equal(
        np.asarray(multi.params["controlnet"][1]["controlnet_mid_block"]["kernel"]),
        np.asarray(pipes["multi"].params["controlnet"][1]["controlnet_mid_block"]["kernel"]))
    # a plain SD folder needs controlnet=
    sd = tmp_path / "sd"
    index = json.load(open(os.path.join(paths["single"], "model_index.json")))
    sd.mkdir()
    json.dump({**{k: v for k, v in index.items() if k != "controlnet"}, "_class_name": "StableDiffusionPipeline"},
              open(sd / "model_index.json", "w"))
    with pytest.raises(ConfigError, match="controlnet="):
        jaxgen.StableDiffusionControlNetPipeline.from_pretrained(sd)
    pipe = pipes["single"]
    image = control_images(60)
    with pytest.raises(DataError, match="image="):
        pipe(PROMPTS)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        pipe(PROMPTS, image * 2 - 1)
    with pytest.raises(DataError, match="resize"):
        pipe(PROMPTS, image, height=32, width=32)
    with pytest.raises(ValueError, match="start < end"):
        pipe(PROMPTS, image, control_guidance_start=0.5, control_guidance_end=0.5)
    with pytest.raises(ValueError, match="one per ControlNet"):
        pipe(PROMPTS, image, controlnet_conditioning_scale=[1.0, 2.0])
    with pytest.raises(DataError, match="list of 2"):
        pipes["multi"](PROMPTS, image)
    with pytest.raises(DataError, match="one per prompt"):
        pipe(PROMPTS, control_images(61, 3))
    with pytest.raises(ConfigError, match="Img2Img"):
        pipe.img2img(PROMPTS, image)
