"""config.init_from: starting a run from a jaxgen run or a diffusers/transformers folder.

(a) a digits autoencoder run initialised from a finished one (step-0 params = its final EMA
params, optimizer state unchanged, trains, a resume does not re-apply, a changed init_from is
refused); (b) a jaxgen U-Net from a diffusers folder with random weights; (c) expand: an 8-channel
U-Net from a 4-channel folder; (d) unmatched keys are one-line errors naming the path and the
field; (e) subtrees: a transformers CLIPTextModel folder into CLIPModel's text_model, prefixes,
and the ControlNet mapping (a U-Net encoder copy plus new controlnet_* params).
"""
from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jaxgen
from jaxgen.errors import ConfigError
from jaxgen.training import init_from as init_from_lib
from jaxgen.training.init_from import apply_init_from, merge_params
from jaxgen.training.stages import stage_config
from jaxgen.training.trainer import Trainer, train, validate_config


def get_config(name, arg="tiny"):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def init_cfg(**fields) -> ml_collections.ConfigDict:
    c = init_from_lib.default_config()
    c.update(fields)
    return c


def flat(tree) -> dict:
    return init_from_lib._flat(tree)


def assert_trees_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def one_line_error(fn, *words):
    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"
    return msg


# ---- (a) from a finished jaxgen run -------------------------------------------------------------
def ae_config():
    c = get_config("digits_ae")
    c.ema.decay = 0.99
    return c


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, data_dir):
    return train(ae_config(), str(tmp_path_factory.mktemp("init_src")))


def test_base_config_has_the_default_field():
    assert get_config("digits_ae").init_from.to_dict() == init_from_lib.DEFAULTS


def test_from_a_jaxgen_run_then_train_then_resume(source_run, tmp_path, monkeypatch):
    c = ae_config()
    c.init_from.source = source_run.workdir
    wd = str(tmp_path / "finetune")
    trainer = Trainer(c, wd)
    state, step = trainer.initial_state()
    assert step == 0
    assert_trees_equal(state.params, source_run.params)      # the source's EMA params
    assert_trees_equal(state.ema_params, source_run.params)  # the EMA starts there too
    # AdamW's state does not depend on the parameter values: zeros (and count 0) either way
    assert_trees_equal(state.opt_state, trainer.tx.init(state.params))
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(state.opt_state))
    trainer.checkpointer.close()
    report = json.load(open(os.path.join(wd, "init_from.json")))
    n = len(flat(source_run.params))
    assert report["counts"] == {"copied": n, "expanded": 0, "new": 0, "zeroed": 0, "dropped": 0}
    assert report["init_from"]["source"] == source_run.workdir and "EMA" in report["source"]

    run = train(c, wd)   # trains from the pretrained weights
    assert run.step == 2
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(run.raw_params),
                                                        jax.tree_util.tree_leaves(source_run.params)))

    def refuse(*args, **kwargs):
        raise AssertionError("init_from applied again on resume")

    monkeypatch.setattr(init_from_lib, "init_state", refuse)
    c.total_steps = 3
    assert train(c, wd).step == 3          # resumed from its checkpoint, not re-initialised
    c.init_from.zero = ("conv_out",)       # a changed init_from is a changed model: refused
    with pytest.raises(ConfigError, match="init_from.zero"):
        Trainer(c, wd).fit()


def test_a_bad_source_fails_before_training(tmp_path, data_dir):
    c = ae_config()
    c.init_from.source = str(tmp_path / "nowhere")
    one_line_error(lambda: train(c, str(tmp_path / "run")), "init_from.source", "no such folder")
    assert not os.path.exists(tmp_path / "run")
    (tmp_path / "junk").mkdir()
    c.init_from.source = str(tmp_path / "junk")
    one_line_error(lambda: train(c, str(tmp_path / "run")), "neither a jaxgen run directory")
    c = ae_config()
    c.init_from.new = ("encoder",)         # patterns without a source
    one_line_error(lambda: validate_config(c), "init_from.source")


def test_a_run_source_and_its_stage(source_run):
    msg = one_line_error(lambda: init_from_lib.check_config(init_cfg(source=source_run.workdir, stage="unet")),
                         "single-stage", "clear the stage")
    assert "unet" in msg, msg


def test_multi_stage_configs_set_init_from_per_stage(source_run):
    c = get_config("shapes_ldm")
    c.stages.unet.init_from = ml_collections.ConfigDict({"source": source_run.workdir, "new": ("controlnet_*",)})
    unet = stage_config(c, "unet").init_from
    assert unet.source == source_run.workdir and unet.new == ("controlnet_*",) and unet.drop == ()
    assert stage_config(c, "vae").init_from.source == ""
    c.stages.unet.init_from.stage = "unet"   # the source is a single-stage run
    one_line_error(lambda: validate_config(c), "config.stages.unet.init_from.stage")
    c = get_config("shapes_ldm")
    c.init_from.source = source_run.workdir
    one_line_error(lambda: validate_config(c), "config.stages.STAGE.init_from")
    assert init_from_lib.report_path("/d", "unet") == "/d/init_from_unet.json"


# ---- (b), (c) from a diffusers folder ----------------------------------------------------------
UNET_CFG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2)


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    from jaxgen.convert.testing import randomize_torch

    folder = str(tmp_path_factory.mktemp("unet_pt"))
    randomize_torch(diffusers.UNet2DConditionModel(**UNET_CFG), seed=3).save_pretrained(folder)
    return folder


def fresh_unet(**changes):
    from jaxgen.nn.unet import UNet2DConditionModel

    shapes = UNet2DConditionModel(**{**UNET_CFG, **changes}).abstract_params()   # no compile
    return jax.tree_util.tree_map(lambda s: np.full(s.shape, 7, s.dtype), shapes)


@pytest.fixture(scope="module")
def unet_params(unet_folder):
    return jaxgen.load_pretrained(unet_folder)[1]


def test_unet_from_a_diffusers_folder(unet_folder, unet_params):
    import safetensors.numpy

    params, report = apply_init_from(init_cfg(source=unet_folder), fresh_unet())
    assert_trees_equal(params, unet_params)
    assert not report.new and not report.dropped and len(report.copied) == len(flat(unet_params))
    state = safetensors.numpy.load_file(os.path.join(unet_folder, "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(params["conv_in"]["kernel"], state["conv_in.weight"].transpose(2, 3, 1, 0))
    assert "UNet2DConditionModel folder" in report.summary() and json.loads(report.to_json())["counts"]["copied"]


def test_expand_conv_in_from_4_to_8_channels(unet_folder, unet_params):
    fresh = fresh_unet(in_channels=8)
    one_line_error(lambda: apply_init_from(init_cfg(source=unet_folder), fresh),
                   "conv_in/kernel (3, 3, 8, 16) <- conv_in/kernel (3, 3, 4, 16)", "init_from.expand")
    params, report = apply_init_from(init_cfg(source=unet_folder, expand=("conv_in/kernel",)), fresh)
    assert report.expanded == ["conv_in/kernel"] and report.sizes["expanded"] == 3 * 3 * 8 * 16
    kernel = np.asarray(params["conv_in"]["kernel"])
    np.testing.assert_array_equal(kernel[:, :, :4], unet_params["conv_in"]["kernel"])
    assert not kernel[:, :, 4:].any()
    rest = {k: v for k, v in flat(params).items() if k != "conv_in/kernel"}
    want = {k: v for k, v in flat(unet_params).items() if k != "conv_in/kernel"}
    assert_trees_equal(rest, want)


# ---- (d) strictness ----------------------------------------------------------------------------
def tree(**shapes):
    """{"a/b": shape} -> a nested params tree of distinct values."""
    out, rng = {}, np.random.default_rng(0)
    for path, shape in shapes.items():
        node = out
        *mods, leaf = path.split("__")
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = rng.standard_normal(shape).astype(np.float32)
    return out


def test_unmatched_keys_are_errors_naming_path_and_field():
    src = tree(enc__kernel=(2, 3), enc__bias=(3,), head__kernel=(3, 5))
    ours = tree(enc__kernel=(2, 3), enc__bias=(3,), cls__kernel=(3, 2))
    one_line_error(lambda: merge_params(src, ours, init_cfg(new=("cls",))), "head/kernel", "init_from.drop")
    one_line_error(lambda: merge_params(src, ours, init_cfg(drop=("head",))), "cls/kernel", "init_from.new")
    one_line_error(lambda: merge_params(src, ours, init_cfg(new=("cls",), drop=("head", "tail"))),
                   "'tail'", "init_from.drop")
    params, report = merge_params(src, ours, init_cfg(new=("cls",), drop=("head",), zero=("enc/bias",)))
    assert report.copied == ["enc/bias", "enc/kernel"] and report.new == ["cls/kernel"]
    assert report.dropped == ["head/kernel"] and report.zeroed == ["enc/bias"]
    np.testing.assert_array_equal(params["enc"]["kernel"], src["enc"]["kernel"])
    assert params["cls"]["kernel"] is ours["cls"]["kernel"] and not params["enc"]["bias"].any()
    bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), ours)
    params, _ = merge_params(src, bf16, init_cfg(new=("cls",), drop=("head",)))
    assert params["enc"]["kernel"].dtype == jnp.bfloat16   # cast to ours
    # a shared name with another shape: mis-shaped unless expand names it
    one_line_error(lambda: merge_params(tree(w=(4,)), tree(w=(3,)), init_cfg(expand=("w",))), "not smaller")


# ---- (e) subtrees ------------------------------------------------------------------------------
def test_prefixes_move_a_subtree():
    src = tree(model__tower__a=(2,), model__tower__b=(3,), model__other=(1,))
    ours = tree(x__a=(2,), x__b=(3,), y=(4,))
    cfg = init_cfg(source_prefix="model/tower", target_prefix="x", new=("y",), drop=("model/other",))
    params, report = merge_params(src, ours, cfg)
    np.testing.assert_array_equal(params["x"]["b"], src["model"]["tower"]["b"])
    assert report.copied == ["x/a", "x/b"]
    one_line_error(lambda: merge_params(src, ours, init_cfg(source_prefix="modle", new=("x", "y"))),
                   "source_prefix='modle'", "model")


def test_controlnet_mapping_is_expressible(unet_params):
    """A ControlNet: the U-Net's encoder under the same names, new controlnet_* zero convs."""
    encoder = {k: v for k, v in unet_params.items() if k in ("conv_in", "time_embedding", "down_blocks_0",
                                                              "down_blocks_1", "mid_block")}
    controlnet = {**jax.tree_util.tree_map(jnp.zeros_like, encoder),
                  "controlnet_down_blocks_0": {"kernel": jnp.ones((1, 1, 16, 16)), "bias": jnp.ones((16,))},
                  "controlnet_mid_block": {"kernel": jnp.ones((1, 1, 32, 32)), "bias": jnp.ones((32,))}}
    cfg = init_cfg(new=("controlnet_*",), drop=("up_blocks_*", "conv_norm_out", "conv_out"),
                   zero=("controlnet_*",))
    params, report = merge_params(unet_params, controlnet, cfg)
    assert_trees_equal({k: params[k] for k in encoder}, encoder)
    assert report.new == report.zeroed and len(report.new) == 4
    assert not any(np.asarray(x).any() for k in report.zeroed for x in [flat(params)[k]])
    assert {p.split("/")[0] for p in report.dropped} >= {"up_blocks_0", "up_blocks_1", "conv_out"}


def test_text_tower_from_a_transformers_folder_into_clip_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from jaxgen.convert.testing import randomize_torch
    from jaxgen.nn.clip import CLIPModel

    text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=20)
    folder = str(tmp_path / "text")
    pt = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text))
    randomize_torch(pt, seed=2).save_pretrained(folder)
    model = CLIPModel(text_config=text, vision_config=dict(hidden_size=16, intermediate_size=32,
                                                           num_hidden_layers=1, num_attention_heads=2,
                                                           image_size=8, patch_size=4), projection_dim=8)
    fresh = model.abstract_params()   # shapes are enough: nothing new is read
    fresh = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), fresh)
    cfg = init_cfg(source=folder, source_prefix="text_model", target_prefix="text_model",
                   new=("vision_model", "visual_projection", "text_projection", "logit_scale"))
    params, report = apply_init_from(cfg, fresh)
    assert_trees_equal(params["text_model"], jaxgen.load_pretrained(folder)[1]["text_model"])
    assert all(p.startswith("text_model/") for p in report.copied) and report.new
    one_line_error(lambda: apply_init_from(init_cfg(source=folder, source_prefix="text_model",
                                                    target_prefix="text_model"), fresh),
                   "vision_model/", "init_from.new")
