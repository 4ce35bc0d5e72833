"""Text-to-video on moving shapes (task "video", configs/shapes_video.py): the clip generator and
its analyzer, the tiny config trained on a tiny frozen base run, run.sample, evaluation, the GIF
CLI and the errors."""
import importlib

import jax
import numpy as np
import pytest
from absl import app, flags
from helpers import shared_tiny_ldm
from PIL import Image

from jaxgen.data import load_dataset, shapes
from jaxgen.errors import ConfigError, DataError
from jaxgen.eval.video import save_clips
from jaxgen.training.tasks import make_task
from jaxgen.training.trainer import train

PROMPTS = ["a red circle moving right", "a small blue square moving up", "a green triangle standing still"]


def tiny_config(base: str):
    c = importlib.import_module("configs.shapes_video").get_config("tiny")
    c.base_run = base
    return c


@pytest.fixture(scope="module")
def base(data_dir):
    return shared_tiny_ldm()


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    return train(tiny_config(base.workdir), str(tmp_path_factory.mktemp("video") / "run"))


# -- data -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_frames", [2, 8, 16])
def test_moving_clips_read_back_as_captioned(num_frames):
    clips = shapes.moving_clips(180, seed=3, num_frames=num_frames)
    frames = clips["frames"]
    assert frames.shape == (180, num_frames, 32, 32, 3) and frames.dtype == np.uint8
    read = shapes.analyze_clips(frames)
    for a in ("shape", "color", "size"):                     # every frame shows the clip's attributes
        np.testing.assert_array_equal(read[a], np.repeat(clips[a][:, None], num_frames, 1))
    np.testing.assert_array_equal(read["direction"], clips["direction"])
    assert read["consistent"].all()
    # the caption names them; the box moves clip_speed px per frame the way the caption says
    speed = shapes.clip_speed(num_frames)
    for j, text in enumerate(clips["caption"]):
        assert f"{shapes.COLORS[clips['color'][j]]} {shapes.SHAPES[clips['shape'][j]]}" in text
        assert text.endswith(shapes.motion_phrase(clips["direction"][j]))
        step = np.diff(read["center"][j], axis=0)             # [F - 1, 2] (dx, dy)
        np.testing.assert_array_equal(step, np.broadcast_to(np.asarray(shapes.DIRECTION_STEPS[clips["direction"][j]])
                                                             * speed, step.shape))
    assert {len(t.split()) for t in clips["caption"]} == {5, 6}   # sized and unsized captions
    assert np.bincount(clips["direction"]).tolist() == [36] * 5
    # the whole shape is on the canvas in every frame
    area = (frames.max(-1) > 0).sum((2, 3))
    assert (area == area[:, :1]).all()


def test_moving_clips_determinism_and_errors():
    a, b = shapes.moving_clips(10, seed=1), shapes.moving_clips(10, seed=1)
    np.testing.assert_array_equal(a["frames"], b["frames"])
    assert not np.array_equal(a["frames"], shapes.moving_clips(10, seed=1, split="test")["frames"])
    assert shapes.motion_caption("circle", "red", "right") == "a red circle moving right"
    assert shapes.motion_caption(1, 2, 2, size="small") == "a small blue square moving up"
    assert shapes.motion_caption("triangle", "green", "still") == "a green triangle standing still"
    np.testing.assert_array_equal(shapes.motion_direction([[5, 5], [5, 5], [5, 5], [5, 5]],
                                                          [[5, 9], [2, 5], [9, 6], [5, 5]], min_shift=3), [3, 0, 1, 4])
    with pytest.raises(DataError, match="at least 2 frames"):
        shapes.moving_clips(2, 0, num_frames=1)
    with pytest.raises(DataError, match="at most 16 frames"):
        shapes.moving_clips(2, 0, num_frames=17)
    with pytest.raises(DataError, match="does not fit"):
        shapes.draw_shape_at("circle", "red", 16, 20, 0)
    with pytest.raises(DataError, match="unknown direction"):
        shapes.motion_caption("circle", "red", "sideways")


def test_shapes_dataset_moving_option(data_dir):
    ds = load_dataset("shapes", "test", moving=4, num_examples=12, seed=2)
    assert ds.images is None and ds.field("frames").shape == (12, 4, 32, 32, 3)
    np.testing.assert_array_equal(ds.field("frames"), shapes.moving_clips(12, 2, 4, split="test")["frames"])
    assert set(ds.attributes) == set(shapes.CLIP_ATTRIBUTES) and len(ds.captions) == 12
    with pytest.raises(DataError, match="moving=1"):
        load_dataset("shapes", "train", moving=1)
    with pytest.raises(DataError, match="masks and edits"):
        load_dataset("shapes", "train", moving=4, masks=True)
    with pytest.raises(DataError, match="no held-out"):
        load_dataset("shapes", "heldout", moving=4)


# -- the run --------------------------------------------------------------------------------------
def test_trains_the_3d_unet_and_a_copy_of_the_text_tower(run, base):
    assert run.step == 2 and run.task.name == "video" and run.task.trains_text
    m = run.task.model
    assert type(m).__name__ == "UNet3DConditionModel"
    assert (m.in_channels, m.out_channels, m.cross_attention_dim) == (4, 4, 32)   # the tiny base's
    assert set(run.params) == {"unet", "text_encoder"} and "transformer_in" in run.params["unet"]
    batch = run.task.example_batch()
    assert batch["latent_mean"].shape == (1, 3, 16, 16, 4)
    # the copy was trained (its token embeddings moved), the base's own tower was not
    ours = run.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    theirs = base.params["text"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert ours.shape == theirs.shape and not np.allclose(ours, theirs)
    assert run.task.base_params["text"]["text_model"]["embeddings"]["token_embedding"]["embedding"] is not ours
    np.testing.assert_array_equal(run.task.base_params["text"]["text_model"]["embeddings"]["token_embedding"]
                                  ["embedding"], theirs)
    # the run conditions on its own tower: its context differs from the base's
    t = ["a red circle moving up"]
    assert not np.allclose(run.task.encode_text(run.params, t), base.task.encode_text(base.params, t))


def test_frozen_text_tower_option(run, base, tmp_path):
    """video.train_text_encoder = False: the params are the U-Net's alone and the loss's contexts
    are the base's, computed once."""
    c = tiny_config(base.workdir)
    c.video.train_text_encoder = False
    task = make_task(c)
    task.attach(str(tmp_path / "frozen"), training=True)
    arrays = task.batch_arrays(load_dataset("shapes", "train", moving=3, num_examples=4))
    params = jax.eval_shape(task.init_params, jax.random.key(0), arrays)
    assert "transformer_in" in params and "text_encoder" not in params
    loss, _ = jax.eval_shape(task.loss_fn, run.params["unet"], arrays, jax.random.key(0))
    assert loss.shape == ()
    np.testing.assert_allclose(task.encode_text(run.params["unet"], ["a red circle"]),
                               base.task.encode_text(base.params, ["a red circle"]), atol=1e-6)
    with c.ignore_type():
        c.video.train_text_encoder = "yes"
    with pytest.raises(ConfigError, match="train_text_encoder"):
        make_task(c)


def test_export_to_diffusers(run, tmp_path):
    """train.export writes a TextToVideoSDPipeline folder: diffusers loads it and reproduces the
    run's sampling with the same latents, the trained text tower included."""
    import json
    import os

    import diffusers
    import torch

    from jaxgen.convert.pretrained import load_pretrained
    from jaxgen.pipelines.export import export_stable_diffusion

    folder = export_stable_diffusion(run, str(tmp_path / "video"))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == "TextToVideoSDPipeline" and "safety_checker" not in index
    assert index["unet"] == ["diffusers", "UNet3DConditionModel"]
    _, text = load_pretrained(os.path.join(folder, "text_encoder"))
    np.testing.assert_array_equal(text["text_model"]["final_layer_norm"]["scale"],
                                  run.params["text_encoder"]["text_model"]["final_layer_norm"]["scale"])
    task = run.task
    prompts = (PROMPTS * 6)[:16]                       # the batch run.sample compiled for
    steps, g, sched = task.sampling_settings(None, None, None)
    latents = np.asarray(jax.random.normal(jax.random.key(3), (16, 3, *task.latent_shape)), np.float32)
    ours = task.pipeline(run.params)(prompts, num_frames=3, height=32, width=32, num_inference_steps=steps,
                                     guidance_scale=g, latents=latents, scheduler=sched)
    pipe = diffusers.TextToVideoSDPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompts, num_frames=3, height=32, width=32, num_inference_steps=steps, guidance_scale=g,
                   latents=torch.from_numpy(latents.transpose(0, 4, 1, 2, 3).copy()), output_type="np").frames
    np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-3)


def test_sample(run):
    prompts = (PROMPTS * 6)[:16]
    clips = run.sample(16, prompts=prompts, seed=1)
    assert clips.shape == (16, 3, 32, 32, 3) and clips.dtype == np.uint8
    np.testing.assert_array_equal(clips, run.sample(16, prompts=prompts, seed=1))
    assert not np.array_equal(clips, run.sample(16, prompts=prompts, seed=2))
    with pytest.raises(DataError, match="prompts"):
        run.sample(2, prompts=PROMPTS)
    with pytest.raises(DataError, match="not labels"):
        run.sample(2, labels=[0, 1])
    with pytest.raises(DataError, match="num_frames"):
        run.sample(2, prompts="a red circle moving right", num_frames=0)


def test_evaluate(run, tmp_path):
    out = run.task.evaluate(run, str(tmp_path))
    assert out["prompts"] == 90 and out["num_frames"] == 3
    for key in ("color_per_frame", "shape_per_frame", "direction", "consistent"):
        assert 0.0 <= out["samples"][key] <= 1.0
        assert out["data_read_back"][key] == 1.0              # the analyzer reads the data itself exactly
    assert set(out["samples"]["direction_by_asked"]) == set(shapes.DIRECTIONS)
    cost = out["cost"]
    assert cost["seconds_per_clip"] > 0 and cost["peak_rss_mib"] > 100 and cost["sampling_batch"] == 16
    with Image.open(tmp_path / "video_grid.gif") as gif:
        assert gif.n_frames == 3 and gif.is_animated
    assert (tmp_path / "video_strip.png").stat().st_size > 0


def _cli(argv):
    import train.sample as cli

    flags.FLAGS(argv)
    try:
        cli.main(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()


def test_sample_cli_writes_gif_and_strip(run, tmp_path):
    _cli(["train.sample", f"--workdir={run.workdir}", f"--out={tmp_path / 'x.gif'}", "--num=16",
          f"--prompt={PROMPTS[0]}", "--seed=1"])
    with Image.open(tmp_path / "x.gif") as gif:                            # GIF frame k: every clip's frame k
        assert gif.n_frames == 3 and gif.size == (8 * 65 + 1, 2 * 65 + 1)  # 2 rows of 8 clips, 2x enlarged
    clips = run.sample(16, prompts=PROMPTS[0], seed=1)
    save_clips(str(tmp_path / "x.png"), clips)                             # what the CLI writes for .png
    with Image.open(tmp_path / "x.png") as im:                             # a row per clip, frames across
        strip = np.asarray(im.convert("RGB"))
    assert strip.shape == (16 * 65 + 1, 3 * 65 + 1, 3)
    np.testing.assert_array_equal(strip[1:65:2, 66:130:2], clips[0, 1])   # clip 0, frame 1
    with pytest.raises(app.UsageError, match=".gif"):
        _cli(["train.sample", f"--workdir={run.workdir}", f"--out={tmp_path / 'x.jpg'}"])


def test_config_and_data_errors(run, base, tmp_path):
    with pytest.raises(DataError, match="'frames'"):             # clips of another length than the model's
        run.task.batch_arrays(load_dataset("shapes", "train", moving=4, num_examples=2))
    c = tiny_config(base.workdir)
    c.video.joint_images = 17
    with pytest.raises(ConfigError, match="joint_images"):
        make_task(c)
    c = tiny_config(base.workdir)
    c.video.caption_dropout = 1.0
    with pytest.raises(ConfigError, match="caption_dropout"):
        make_task(c)
    c = tiny_config(base.workdir)
    c.model.cross_attention_dim = 64
    with pytest.raises(ConfigError, match="cross_attention_dim=64.*leave it out"):
        make_task(c).attach(str(tmp_path / "a"), training=True)
    c = tiny_config(base.workdir)
    c.model_class = "jaxgen.nn.unet:UNet2DConditionModel"
    with pytest.raises(ConfigError, match="UNet3DConditionModel"):
        make_task(c).attach(str(tmp_path / "b"), training=True)
    c = tiny_config("")
    with pytest.raises(ConfigError, match="base_run"):
        make_task(c)


def test_joint_image_loss(run, base, tmp_path):
    """video.joint_images = K: K of the base's still images join every step as one-frame clips."""
    c = tiny_config(base.workdir)
    c.video.joint_images = 2
    c.video.temporal_dropout = True                                      # diffusers' train-mode dropout
    task = make_task(c)
    task.attach(str(tmp_path / "joint"), training=True)
    arrays = task.batch_arrays(load_dataset("shapes", "train", moving=3, num_examples=4))
    assert arrays["image_mean"].shape == (4, 16, 16, 4) and arrays["latent_mean"].shape == (4, 3, 16, 16, 4)
    assert arrays["image_caption"].max() < len(task.table_ids) - 1           # image captions are in the table
    # the step's program (traced, not compiled: the clips-only step is trained above)
    loss, metrics = jax.eval_shape(task.loss_fn, run.params, arrays, jax.random.key(0))
    assert loss.shape == () and set(metrics) == {"mse", "mse_images"}
