"""LoRA trained on a frozen latent-diffusion run (task "lora", configs/shapes_lora.py): the new
shape's renders and analyzer, only the adapters trained and checkpointed, lora_scale 0 is the
base, evaluation, and diffusers' load_lora_weights on the exported base reproducing the run.
"""
import copy
import importlib
import os

import jax
import numpy as np
import pytest
from helpers import shared_tiny_ldm

from jaxgen.data import shapes
from jaxgen.errors import ConfigError
from jaxgen.pipelines.export import export_stable_diffusion
from jaxgen.training.tasks import make_task
from jaxgen.training.trainer import train

PROMPTS = ["a large red cross on the left", "a small blue square at the top"]


def tiny_config(base: str):
    c = importlib.import_module("configs.shapes_lora").get_config("tiny")
    c.base_run = base
    return c


@pytest.fixture(scope="module")
def base(data_dir):
    return shared_tiny_ldm()


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    return train(tiny_config(base.workdir), str(tmp_path_factory.mktemp("lora") / "run"))


def test_cross_renders_and_analyzer():
    ex = shapes.extra_shape_examples("cross", 60, 0)
    assert shapes.is_cross(ex["image"]).all()
    read = shapes.analyze(ex["image"])
    for a in ("color", "size", "position"):
        np.testing.assert_array_equal(read[a], ex[a])
    known = shapes.generate_split("test", 300)["image"]
    assert not shapes.is_cross(known).any()
    assert ex["caption"][0] == "a small red cross on the left"


def test_only_adapters_are_trained_and_saved(run, base):
    assert set(run.params) == {"unet"}
    leaves = jax.tree_util.tree_leaves(run.params)
    assert leaves and all(x.ndim == 2 or x.ndim == 4 for x in leaves)
    keys = list(run.params["unet"])
    assert all(k.endswith("kernel") and (".attn1." in k or ".attn2." in k or ".conv1." in k or ".conv2." in k)
               for k in keys)
    assert any(".conv1." in k for k in keys) and any(".attn2." in k for k in keys)
    assert all(set(v) == {"down", "up"} for v in run.params["unet"].values())
    sizes = run.task.adapter_bytes(run.params)
    assert 0 < sizes["lora"] < sizes["unet"] / 5
    assert any(float(np.abs(np.asarray(v["up"])).max()) > 0 for v in run.params["unet"].values())  # trained


def test_scale_zero_is_the_base(run, base):
    np.testing.assert_array_equal(run.sample(2, prompts=PROMPTS, seed=1, lora_scale=0.0),
                                  base.sample(2, prompts=PROMPTS, seed=1))
    assert run.sample(2, prompts=PROMPTS, seed=1).shape == (2, 32, 32, 3)


def test_preservation_target_base_distills_to_the_frozen_base(run):
    """With preservation_target "base" (the config's), a preserved example's target is the base
    U-Net's own prediction: with adapters that merge to the base (up = 0) its loss is exactly 0,
    while the new shape's examples keep the diffusion loss."""
    task = copy.copy(run.task)          # its own context table (training builds it from the data)
    assert task.config.lora.preservation_target == "base"
    task.table = task.context_table(PROMPTS)
    zero = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32), jax.device_get(run.params))
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(8, *task.latent_shape)).astype(np.float32)
    batch = {"latent_mean": mean, "latent_std": np.zeros_like(mean), "caption": np.zeros(8, np.int32)}
    key = jax.random.key(3)
    preserved, _ = task.loss_fn(zero, dict(batch, preserve=np.ones(8, np.float32)), key)
    new_shape, _ = task.loss_fn(zero, dict(batch, preserve=np.zeros(8, np.float32)), key)
    assert float(preserved) == 0.0 and float(new_shape) > 1e-3


def test_config_errors(base, tmp_path):
    c = tiny_config(base.workdir)
    c.lora.target_modules = ("no_such_module",)
    with pytest.raises(ConfigError, match="matches no Dense or Conv kernel"):
        make_task(c).attach(str(tmp_path / "x"), training=True)
    c = tiny_config(base.workdir)
    c.lora.new_shape = "star"
    with pytest.raises(ConfigError, match="lora.new_shape"):
        make_task(c)
    c = tiny_config(base.workdir)
    c.lora.preservation_target = "teacher"
    with pytest.raises(ConfigError, match="lora.preservation_target='teacher': choose one of data, base"):
        make_task(c)


def test_evaluate(run, tmp_path):
    out = run.task.evaluate(run, str(tmp_path))
    assert set(out["new_word"]) == {"lora", "base"} and "is_cross" in out["new_word"]["lora"]
    assert set(out["without_word"]["ratio"]) == {"shape", "color", "size", "position"}
    assert 0 < out["checkpoint"]["fraction"] < 0.2
    assert os.path.getsize(tmp_path / "lora_cross.png") > 0


def test_export_lora_file_loads_in_diffusers_and_reproduces(run, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    folder = export_stable_diffusion(run, str(tmp_path / "sd"))
    assert os.path.isfile(os.path.join(folder, "lora", "pytorch_lora_weights.safetensors"))
    task = run.task
    noise = np.asarray(jax.random.normal(jax.random.key(5), (2, *task.latent_shape)), np.float32)
    merged = dict(task.base_params, unet=task.unet_params(run.params))
    ours = task.ldm.pipeline(merged)(PROMPTS, num_inference_steps=3, guidance_scale=3.0, latents=noise)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(os.path.join(folder, "lora"))
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, output_type="np",
                   latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
    np.testing.assert_allclose(ours, ref, atol=1e-3)
