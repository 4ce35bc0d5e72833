"""InstructPix2Pix trained on a frozen latent-diffusion run (task "ip2p", configs/shapes_ip2p.py):
the edit triplets, the zero-expanded start (equal to the base U-Net on the latent channels), the
run's edit ability and CLI, evaluation, and diffusers' StableDiffusionInstructPix2PixPipeline
reproducing the export.
"""
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import shared_tiny_ldm
from PIL import Image

import jaxgen
from jaxgen.data import load_dataset, shapes
from jaxgen.errors import DataError
from jaxgen.pipelines.export import export_stable_diffusion
from jaxgen.training.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTIONS = ["make it blue", "move it to the left"]


def tiny_config(base: str):
    c = importlib.import_module("configs.shapes_ip2p").get_config("tiny")
    c.base_run = base
    return c


@pytest.fixture(scope="module")
def base(data_dir):
    return shared_tiny_ldm()


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    return train(tiny_config(base.workdir), str(tmp_path_factory.mktemp("ip2p") / "run"))


def inputs():
    return np.stack([shapes.draw_shape("circle", "red", "large", "center"),
                     shapes.draw_shape("square", "green", "small", "right")])


def test_edit_triplets_change_exactly_the_asked_attribute(data_dir):
    ds = load_dataset("shapes", "test", data_dir=data_dir, edits=True, num_examples=200)
    src, out = shapes.analyze(ds.field("source")), shapes.analyze(ds.images)
    kinds = {shapes.EDIT_KINDS.index(k) for k in shapes.EDIT_KINDS}
    for j, text in enumerate(ds.texts["instruction"]):
        changed = [a for a in shapes.ATTRIBUTES if src[a][j] != out[a][j]]
        assert len(changed) == 1, (text, changed)
    trip = shapes.edit_triplets(shapes.generate_split("test", 40), 0, "test", canonical=True)
    assert set(trip["kind"].tolist()) == kinds
    for text, k in zip(trip["instruction"], trip["kind"]):
        assert text.startswith(("make it", "turn it into a", "move it to the")) and k in kinds
    assert shapes.edit_instruction("position", 0) == "move it to the left"
    assert shapes.edit_instruction("shape", 1) == "turn it into a square"


def test_expanded_start_is_the_base_unet(run, base):
    """init_from copies the base U-Net with conv_in zero on the image-latent channels."""
    report = json.load(open(os.path.join(run.workdir, "init_from.json")))
    assert report["expanded"] == ["conv_in/kernel"] and report["counts"]["new"] == 0
    task = run.task
    p0 = jax.tree_util.tree_map(np.asarray, base.params["unet"])
    k = p0["conv_in"]["kernel"]
    p0["conv_in"]["kernel"] = np.concatenate([k, np.zeros_like(k)], axis=2)
    h, w, c = task.latent_shape
    z = jax.random.normal(jax.random.key(0), (2, h, w, c))
    img = jax.random.normal(jax.random.key(1), (2, h, w, c))
    ctx = jax.random.normal(jax.random.key(2), (2, 77, task.ldm.context_dim))
    t = jnp.asarray([10, 500])
    ours = task.model.apply({"params": p0}, jnp.concatenate([z, img], -1), t, ctx)
    ref = base.task.model.apply({"params": base.params["unet"]}, z, t, ctx)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_edit(run):
    out = run.edit(inputs(), INSTRUCTIONS)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, run.edit(inputs(), INSTRUCTIONS))
    one = run.edit(inputs(), "make it blue", image_guidance_scale=1.0)
    assert one.shape == (2, 32, 32, 3)
    with pytest.raises(DataError, match="instructions is empty"):
        run.edit(inputs(), [])
    with pytest.raises(DataError, match="3 instructions for 2 images"):
        run.edit(inputs(), INSTRUCTIONS + ["make it small"])
    with pytest.raises(DataError):
        run.edit(inputs()[:, :16], INSTRUCTIONS)


def test_evaluate(run, tmp_path):
    out = run.task.evaluate(run, str(tmp_path))
    assert set(out["by_image_guidance"]) == {"1", "1.5", "2"}
    assert 0.0 <= out["at_default"]["all"]["edit_accuracy"] <= 1.0
    assert os.path.getsize(tmp_path / "edits_ig1.5.png") > 0


def test_sample_cli_edits_png(run, tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(inputs()[0]).save(path)
    out = subprocess.run([sys.executable, "-m", "train.sample", f"--workdir={run.workdir}", f"--image={path}",
                          "--prompt=make it blue", f"--out={tmp_path / 'out.png'}"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    assert os.path.getsize(tmp_path / "out.png") > 0


def test_export_loads_in_diffusers_and_reproduces(run, tmp_path):
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    folder = export_stable_diffusion(run, str(tmp_path / "ip2p"))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    task = run.task
    noise = np.asarray(jax.random.normal(jax.random.key(5), (2, *task.latent_shape)), np.float32)
    images = inputs().astype(np.float32) / 255.0
    kw = dict(num_inference_steps=3, guidance_scale=3.0, image_guidance_scale=1.5)
    ours = task.pipeline(run.params)(INSTRUCTIONS, image=images, latents=noise, **kw)
    loaded = jaxgen.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
    np.testing.assert_allclose(loaded(INSTRUCTIONS, image=images, latents=noise, **kw), ours, atol=1e-5)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
    with torch.no_grad():
        ref = pipe(INSTRUCTIONS, image=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                   latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), output_type="np", **kw).images
    np.testing.assert_allclose(ours, ref, atol=1e-3)
