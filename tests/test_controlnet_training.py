"""A ControlNet trained on a frozen latent-diffusion run (task "controlnet",
configs/shapes_controlnet.py): the from_unet start samples exactly as the base, only the
ControlNet is trained and checkpointed, the run samples under control images, the base is
checked, evaluation runs, and diffusers' StableDiffusionControlNetPipeline reproduces the export.
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
from jaxgen.errors import CheckpointError, ConfigError, DataError
from jaxgen.pipelines.export import export_stable_diffusion
from jaxgen.training.tasks import make_task
from jaxgen.training.trainer import train

PROMPTS = ["a red shape", "a large blue square at the top"]


def tiny_config(base: str):
    c = importlib.import_module("configs.shapes_controlnet").get_config("tiny")
    c.base_run = base
    return c


@pytest.fixture(scope="module")
def base(data_dir):
    return shared_tiny_ldm()


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    return train(tiny_config(base.workdir), str(tmp_path_factory.mktemp("cn") / "run"))


def masks(n=2):
    images = np.stack([shapes.draw_shape("square", "red", "large", "center"),
                       shapes.draw_shape("circle", "red", "small", "left")][:n])
    return shapes.shape_masks(images)                                     # [n, 32, 32, 1]


def test_from_unet_start_samples_as_the_base(run, base):
    """Zero convolutions: at step 0 the ControlNet adds nothing, whatever the control."""
    task = run.task
    p0 = task.init_params(jax.random.key(0), task.example_batch())
    ours = task.sample(p0, 2, prompts=PROMPTS, control=masks(), seed=3)
    ref = base.sample(2, prompts=PROMPTS, seed=3)
    np.testing.assert_array_equal(ours, ref)


def test_only_the_controlnet_is_trained_and_saved(run, base):
    assert run.step == 2
    top = set(run.params)
    assert {"controlnet_cond_embedding", "controlnet_down_blocks_0", "controlnet_mid_block"} <= top
    assert not any(k.startswith(("up_blocks", "conv_out")) for k in top)       # the U-Net's decoder is not ours
    record = json.load(open(os.path.join(run.workdir, "base_run.json")))
    assert record["path"] == base.workdir and record["step"] == base.step and len(record["fingerprint"]) == 64
    # the base's parameters are untouched, and the zero convolutions moved
    assert float(np.abs(np.asarray(run.params["controlnet_mid_block"]["kernel"])).max()) > 0


def test_sample_under_control(run):
    images = run.sample(2, prompts=PROMPTS, control=masks())
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    again = run.sample(2, prompts=PROMPTS, control=np.repeat(masks(), 3, axis=-1))   # 1 or 3 channels
    np.testing.assert_array_equal(images, again)
    one = run.sample(2, prompts="a red shape", control=masks(1))                 # one control for all
    assert one.shape == (2, 32, 32, 3)
    with pytest.raises(DataError, match="control="):
        run.sample(2, prompts=PROMPTS)
    with pytest.raises(DataError, match="control images must be uint8"):
        run.sample(2, prompts=PROMPTS, control=masks()[:, :16])
    with pytest.raises(DataError, match="3 control images for 2 samples"):
        run.sample(2, prompts=PROMPTS, control=np.concatenate([masks(), masks(1)]))


def test_base_is_checked(run, base, tmp_path):
    c = tiny_config(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="base_run"):
        make_task(c).attach(str(tmp_path / "x"), training=True)
    c = tiny_config(run.workdir)                       # a controlnet run is not an ldm run
    with pytest.raises(ConfigError, match="'controlnet' run"):
        make_task(c).attach(str(tmp_path / "y"), training=True)
    c = tiny_config("")
    with pytest.raises(ConfigError, match="config.base_run"):
        make_task(c)
    # a base whose parameters changed since training is refused
    record = os.path.join(run.workdir, "base_run.json")
    saved = open(record).read()
    try:
        data = json.loads(saved)
        data["fingerprint"] = "0" * 64
        open(record, "w").write(json.dumps(data))
        with pytest.raises(CheckpointError, match="not the one this run was trained on"):
            jaxgen.load_run(run.workdir)
    finally:
        open(record, "w").write(saved)


def test_evaluate(run, tmp_path):
    out = run.task.evaluate(run, str(tmp_path))
    mf = out["mask_following"]
    assert mf["samples"] == 180 and 0.0 <= mf["iou_mean"] <= 1.0 and 0.0 <= mf["color"] <= 1.0
    assert set(out["prompt_against_mask"]) == {"0.5", "1.0", "1.5"}
    assert out["qr_patterns"]["patterns"] == 6
    for png in ("controlnet_masks.png", "controlnet_prompt_vs_mask.png", "controlnet_qr.png"):
        assert os.path.getsize(tmp_path / png) > 0


def test_export_loads_in_diffusers_and_reproduces(run, tmp_path):
    import torch
    from diffusers import StableDiffusionControlNetPipeline

    folder = export_stable_diffusion(run, str(tmp_path / "cn"))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    assert index["controlnet"] == ["diffusers", "ControlNetModel"]
    task = run.task
    noise = np.asarray(jax.random.normal(jax.random.key(5), (2, *task.latent_shape)), np.float32)
    control = np.repeat(masks(), 3, axis=-1).astype(np.float32) / 255.0
    ours = task.pipeline(run.params)(PROMPTS, image=control, num_inference_steps=3, guidance_scale=3.0,
                                     latents=noise)
    loaded = jaxgen.StableDiffusionControlNetPipeline.from_pretrained(folder)
    np.testing.assert_allclose(loaded(PROMPTS, image=control, num_inference_steps=3, guidance_scale=3.0,
                                      latents=noise), ours, atol=1e-5)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder)
    with torch.no_grad():
        ref = pipe(PROMPTS, image=torch.from_numpy(control.transpose(0, 3, 1, 2).copy()), num_inference_steps=3,
                   guidance_scale=3.0, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
                   output_type="np").images
    np.testing.assert_allclose(ours, ref, atol=1e-3)
