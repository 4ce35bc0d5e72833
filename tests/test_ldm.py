"""Latent diffusion from scratch (task "ldm", configs/shapes_ldm.py) and the diffusers export.

One ':tiny' run (every stage 2 steps of batch 16) is trained once per module; the tests check
the whole stack through the Run, that run.sample is jaxgen's StableDiffusionPipeline over the
run's stack (one sampler), an exact resume inside the U-Net stage, the evaluation, and that
diffusers' own StableDiffusionPipeline, loading the exported folder, reproduces jaxgen's sampling
(same initial latents) within 1e-3.
"""
import importlib
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from helpers import shared_tiny_ldm

import jaxgen
from jaxgen.data.dataset import ArrayDataset
from jaxgen.errors import CheckpointError, ConfigError, DataError
from jaxgen.pipelines.export import export_stable_diffusion
from jaxgen.pipelines.stable_diffusion import StableDiffusionPipeline
from jaxgen.training.stages import final_params, stage_config
from jaxgen.training.tasks import make_task
from jaxgen.training.trainer import Trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a large red circle on the left", "a small blue square at the top"]


def tiny_config():
    return importlib.import_module("configs.shapes_ldm").get_config("tiny")


@pytest.fixture(scope="module")
def run(data_dir):
    """The session's tiny shapes_ldm run (trained once, shared with the families trained on it)."""
    return shared_tiny_ldm()


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    return export_stable_diffusion(run, str(tmp_path_factory.mktemp("export") / "sd"))


def test_config_arguments():
    mod = importlib.import_module("configs.shapes_ldm")
    assert mod.__doc__.startswith("python -m train --config configs/shapes_ldm.py")
    default, demo = mod.get_config(), mod.get_config("demo")
    for c in (default, demo):
        assert set(c.stages) == {"vae", "text", "unet"}
        assert c.sampling.scheduler_config.clip_sample is False and c.sampling.scheduler_config.steps_offset == 1
    assert demo.stages.unet.total_steps < default.stages.unet.total_steps
    with pytest.raises(ValueError, match="exclude each other"):
        mod.get_config("tiny,demo")


def test_whole_stack_through_the_run(run):
    assert run.step == 2 and set(run.params) == {"vae", "text", "unet"}
    task = run.task
    stats = json.load(open(os.path.join(run.workdir, "latent_stats.json")))
    assert stats["scaling_factor"] == pytest.approx(task.scaling_factor)
    assert stats["num_images"] == run.config.diffusion.stats_images
    assert task.vae.scaling_factor == task.scaling_factor
    assert os.path.isfile(os.path.join(run.workdir, "tokenizer", "vocab.json"))
    for stage in ("vae", "text", "unet"):
        assert os.path.isdir(os.path.join(run.workdir, "checkpoints", stage))
    # two images per call everywhere: the compiled samplers are shared with the export tests
    images = run.sample(2, prompts=PROMPTS[0], seed=1)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    again = run.sample(2, prompts=[PROMPTS[0]], seed=1)
    np.testing.assert_array_equal(images, again)                       # seeded
    assert run.sample(2, prompts=PROMPTS, guidance_scale=1.0).shape == (2, 32, 32, 3)
    real = task.vae_stage.load_data("test").images[:4]
    assert run.reconstruct(real).shape == real.shape
    z = run.encode(real)
    assert z.shape == (4, *task.latent_shape) and z.dtype == np.float32
    assert run.decode(z).shape == real.shape
    assert run.encode_text(PROMPTS).shape == (2, 16)
    with pytest.raises(DataError, match="prompts="):
        run.sample(2, labels=[0, 1])
    with pytest.raises(DataError, match="one per image"):
        run.sample(3, prompts=PROMPTS)
    with pytest.raises(ConfigError, match="unknown"):
        run.sample(1, prompts=PROMPTS[0], scheduler="NoSuchScheduler")


def own_pipeline(run) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline built here from the run's components (not the task's cached one)."""
    c = run.task.pipeline_components(run.params)
    return StableDiffusionPipeline(c["unet"][0], c["vae"][0], c["text_encoder"][0],
                                   {k: c[k][1] for k in ("unet", "vae", "text_encoder")}, c["tokenizer"],
                                   c["scheduler"])


def to_uint8(images):
    return np.round(images * 255).astype(np.uint8)


def test_run_sample_is_the_pipeline(run):
    """One sampler: run.sample is StableDiffusionPipeline over the run's stack from the same
    initial latents, normal(fold_in(key(seed), 0)); chunks of sampling.batch_size are pipeline
    calls; stochastic schedulers take the chunk's seed key fold_in(fold_in(key(seed), 1), n)."""
    task = run.task
    assert task.pipeline(run.params) is task.pipeline(run.params)            # cached per params
    pipe = own_pipeline(run)
    key = jax.random.key(3)
    latents = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (4, *task.latent_shape)), np.float32)
    s = run.config.sampling
    ref = pipe(PROMPTS, num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, latents=latents[:2])
    np.testing.assert_array_equal(run.sample(2, seed=3, prompts=PROMPTS), to_uint8(ref))
    # chunks: sampling.batch_size 2 makes 4 images two pipeline calls of 2
    ref2 = pipe(PROMPTS, num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, latents=latents[2:])
    old = s.batch_size
    s.batch_size = 2
    try:
        chunked = run.sample(4, seed=3, prompts=PROMPTS * 2)
    finally:
        s.batch_size = old
    np.testing.assert_array_equal(chunked, to_uint8(np.concatenate([ref, ref2])))
    # a stochastic scheduler: the per-step noise is the pipeline's, from the chunk's seed key
    ddpm = task.make_scheduler("DDPMScheduler")
    ref = pipe(PROMPTS, num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, latents=latents[:2],
               scheduler=ddpm, seed=jax.random.fold_in(jax.random.fold_in(key, 1), 0))
    np.testing.assert_array_equal(run.sample(2, seed=3, prompts=PROMPTS, scheduler="DDPMScheduler"), to_uint8(ref))


def test_training_context_is_the_pipelines(run):
    """The U-Net stage's context table is the pipeline's prompt encoding: the text tower's
    last_hidden_state over the 77 ids of each caption (and of "")."""
    task = run.task
    stage = task.stage_task("unet", {"vae": run.params["vae"], "text": run.params["text"]},
                            stage_config(run.config, "unet"))
    texts = PROMPTS + [""]
    table = stage.text_context(texts)
    assert table.shape == (3, 77, task.context_dim) and table.dtype == np.float32
    np.testing.assert_array_equal(table, task.pipeline(run.params).encode_prompt(texts))
    ids = task.tokenizer(texts)
    direct = task.text_encoder.apply({"params": {"text_model": run.params["text"]["text_model"]}},
                                     ids).last_hidden_state
    np.testing.assert_allclose(table, np.asarray(direct), rtol=1e-5, atol=1e-6)


def test_inputs_and_abilities(run):
    """The stages declare their inputs; a dataset without captions is refused by the generic
    missing-field error; the run offers the abilities the task declares."""
    task = run.task
    assert task.vae_stage.inputs()["image"].shape == (32, 32, 3)
    stage = task.stage_task("unet", {"vae": run.params["vae"], "text": run.params["text"]},
                            stage_config(run.config, "unet"))
    spec = stage.inputs()
    assert set(spec) == {"image", "caption"} and spec["caption"].kind == "text"
    no_captions = ArrayDataset(images=np.zeros((4, 32, 32, 3), np.uint8), name="blank", split="train")
    with pytest.raises(DataError, match="missing field.*'caption'"):
        stage.batch_arrays(no_captions)
    assert task.vae_stage.batch_arrays(no_captions)["image"].shape == (4, 32, 32, 3)
    assert {"sample", "encode", "decode", "reconstruct", "encode_text", "encode_image"} <= set(task.abilities)
    for name in task.abilities:
        if name != "tokenizer":                         # run.tokenizer: task.tokenizer_for(DIR)
            assert callable(getattr(task, name)), name
    assert run.tokenizer is not None


def test_resume_inside_the_unet_stage_is_exact(run, tmp_path, data_dir):
    """Stages vae and text finished, the U-Net stopped after 1 of 2 steps: the same command
    resumes the U-Net (the scaling factor read back and checked) and ends where the
    uninterrupted run did."""
    c = tiny_config()
    wd = str(tmp_path / "interrupted")
    for part in ("checkpoints/vae", "checkpoints/text", "tokenizer"):    # the finished stages
        shutil.copytree(os.path.join(run.workdir, part), os.path.join(wd, part))
    task = make_task(c)
    task.attach(wd, training=True)
    frozen = {}
    for stage in ("vae", "text", "unet"):
        sc = stage_config(c, stage)
        trainer = Trainer(sc, wd, stage, task.stage_task(stage, frozen, sc), run_config=c)
        state = trainer.fit(stop_after=1 if stage == "unet" else None)   # vae, text: restored only
        trainer.checkpointer.close()
        frozen[stage] = final_params(state)
    assert int(state.step) == 1
    resumed = train(c, wd)
    assert resumed.step == 2
    for stage in ("vae", "text", "unet"):
        for a, b in zip(jax.tree_util.tree_leaves(run.params[stage]), jax.tree_util.tree_leaves(resumed.params[stage])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # a resumed U-Net stage whose latents no longer give the saved scaling factor is refused
    again = make_task(c)
    again.attach(wd, training=True)
    with pytest.raises(ConfigError, match="scaling_factor"):
        again.set_scaling_factor(2 * again.scaling_factor, training=True)
    os.remove(os.path.join(wd, "latent_stats.json"))
    with pytest.raises(CheckpointError, match="latent_stats.json is missing"):
        jaxgen.load_run(wd)


def test_evaluate_writes_metrics_and_grids(run, tmp_path):
    out = run.task.evaluate(run, str(tmp_path))
    adh = out["adherence_all_combinations"]
    assert set(adh) == {"shape", "color", "size", "position", "all"}
    assert out["adherence_all_combinations"] and out["adherence_heldout_combinations"]
    assert 0.0 <= out["vae_test_mse"] < 1.0
    assert out["sampling_default"]["scheduler"] == "DDIMScheduler"
    for png in ("prompt_grid.png", "all_prompts.png", "reconstructions.png"):
        assert os.path.getsize(tmp_path / png) > 0


def test_export_layout(exported, run):
    index = json.load(open(os.path.join(exported, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    vae_cfg = json.load(open(os.path.join(exported, "vae", "config.json")))
    assert vae_cfg["scaling_factor"] == pytest.approx(run.task.scaling_factor)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.listdir(os.path.join(exported, part))
    with pytest.raises(ConfigError, match="not empty"):
        export_stable_diffusion(run, exported)
    assert export_stable_diffusion(run, exported, overwrite=True) == exported
    clip_like = types.SimpleNamespace(task=types.SimpleNamespace(name="clip"), params={})
    with pytest.raises(ConfigError, match="pipeline_components"):
        export_stable_diffusion(clip_like, exported + "_other")


@pytest.fixture(scope="module")
def diffusers_pipe(exported):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(exported)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_diffusers_pipeline_reproduces_jaxgen(exported, diffusers_pipe, run, guidance):
    import torch

    pipe = diffusers_pipe
    task = run.task
    noise = np.asarray(jax.random.normal(jax.random.key(7), (2, *task.latent_shape)), np.float32)
    sampler = task.pipeline(run.params)                                      # what run.sample runs
    ours = sampler(PROMPTS, num_inference_steps=3, guidance_scale=guidance, latents=noise, output_type="latent")
    latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())          # NHWC -> NCHW
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=3, guidance_scale=guidance, latents=latents,
                   output_type="latent").images.numpy().transpose(0, 2, 3, 1)
        ref_images = pipe(PROMPTS, num_inference_steps=3, guidance_scale=guidance, latents=latents,
                          output_type="np").images
    assert np.abs(ours - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())
    our_images = sampler(PROMPTS, num_inference_steps=3, guidance_scale=guidance, latents=noise)
    np.testing.assert_allclose(our_images, ref_images, atol=1e-3)


def test_jaxgen_pipeline_loads_the_export(exported, run):
    pipe = jaxgen.StableDiffusionPipeline.from_pretrained(exported)
    task = run.task
    noise = np.asarray(jax.random.normal(jax.random.key(8), (2, *task.latent_shape)), np.float32)
    images = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, latents=noise)
    ours = task.pipeline(run.params)(PROMPTS, num_inference_steps=3, guidance_scale=3.0, latents=noise)
    np.testing.assert_allclose(images, ours, atol=1e-4)


def test_export_cli(run, tmp_path):
    out = subprocess.run([sys.executable, "-m", "train.export", f"--workdir={run.workdir}",
                          f"--out={tmp_path / 'sd'}"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    assert os.path.isfile(tmp_path / "sd" / "model_index.json")


def test_sample_cli_per_prompt(run, tmp_path, capsys):
    """``python -m train.sample --prompt A --prompt B --per_prompt K`` (its main, in this process):
    K images per prompt, the same as run.sample, and a labelled PNG; --adherence prints the
    analyzer's read-back per prompt (make demo's last lines), and refuses a non-shapes prompt."""
    from absl import app, flags

    import train.sample as cli
    from jaxgen.eval.shapes import caption_adherence, format_adherence

    def call(*args):
        argv = ["train.sample", f"--workdir={run.workdir}", "--seed=1", *args]
        flags.FLAGS(argv)
        try:
            cli.main(argv[:1])
        finally:
            flags.FLAGS.unparse_flags()

    for out, extra in ((tmp_path / "s.npz", ()), (tmp_path / "s.png", ("--adherence",))):
        call(f"--out={out}", "--per_prompt=1", f"--prompt={PROMPTS[0]}", f"--prompt={PROMPTS[1]}", *extra)
    saved = np.load(tmp_path / "s.npz")
    assert list(saved["prompts"]) == PROMPTS
    np.testing.assert_array_equal(saved["images"], run.sample(2, seed=1, prompts=PROMPTS))
    assert os.path.getsize(tmp_path / "s.png") > 0
    assert format_adherence(caption_adherence(PROMPTS, saved["images"])) in capsys.readouterr().out
    with pytest.raises(app.UsageError, match="--adherence: 'a red blob' is not a canonical shapes caption"):
        call(f"--out={tmp_path / 'x.png'}", "--adherence", "--prompt=a red blob")


def test_config_errors(data_dir):
    c = tiny_config()
    c.model.cross_attention_dim = 24
    with pytest.raises(ConfigError, match="cross_attention_dim=32"):
        make_task(c)
    c = tiny_config()
    c.model.sample_size = 8
    with pytest.raises(ConfigError, match="sample_size=16"):
        make_task(c)
    c = tiny_config()
    c.diffusion.caption_dropout = 1.0
    with pytest.raises(ConfigError, match="caption_dropout"):
        make_task(c)
    c = tiny_config()
    c.stages.vae.objective.reconstruction = "ssim"
    with pytest.raises(ConfigError, match="reconstruction"):
        make_task(c)
