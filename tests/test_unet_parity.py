"""UNet2DModel / UNet2DConditionModel against diffusers, both directions, float32, rel. err <= 1e-5.

For each small config: diffusers builds the model, every weight is randomised, save_pretrained
writes a folder, jaxgen.load_pretrained reads it and must give diffusers' output. Then the other
way: jaxgen.save_pretrained writes new weights, diffusers' from_pretrained must give jaxgen's output.
One jit per config (the reverse direction reuses it with new parameters).
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

import jaxgen  # noqa: E402
from jaxgen.convert.testing import randomize_torch  # noqa: E402
from jaxgen.errors import ConfigError, DataError  # noqa: E402
from helpers import nchw, nhwc, perturbed, rel_err  # noqa: E402

TOL = 1e-5


def randomize(model, seed: int = 0):
    """randomize_torch, with the Fourier projection's frequencies ~ N(0, 4²)."""
    return randomize_torch(model, seed, {"time_proj.weight": 4.0})


# ---- configs ------------------------------------------------------------------------------------
UNET2D = {
    # attention in the second level and the mid block, head size 8 (4 heads of 32 channels), a learned
    # time embedding table and an identity class embedding (the caller's [B, 64] vectors)
    "attn_head8": dict(cfg=dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                norm_num_groups=4, attention_head_dim=8, time_embedding_type="learned",
                                num_train_timesteps=1000, class_embed_type="identity"),
                       size=8, labels="vec64", int_t=True),
    # class labels, scale_shift, one head (None), resnet up/down samplers, VAE-style padding 0, centring
    "class_scaleshift": dict(cfg=dict(sample_size=8, in_channels=2, out_channels=3, block_out_channels=(16, 24),
                                      down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), layers_per_block=1,
                                      norm_num_groups=4, attention_head_dim=None, num_class_embeds=5,
                                      resnet_time_scale_shift="scale_shift", attn_norm_num_groups=2,
                                      downsample_type="resnet", upsample_type="resnet", downsample_padding=0,
                                      flip_sin_to_cos=False, freq_shift=1, center_input_sample=True,
                                      mid_block_scale_factor=1.4, norm_eps=1e-6),
                             size=8, labels="int"),
    # no attention anywhere, Fourier time features (output divided by sigma), GELU, 2 resnets per level
    "fourier_noattn": dict(cfg=dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                    layers_per_block=2, norm_num_groups=4, add_attention=False,
                                    time_embedding_type="fourier", act_fn="gelu"),
                           size=8, labels=None, positive_t=True),
}

COND = {
    # SD 1.x-like: conv projections, 2 heads everywhere
    "sd1": dict(cfg=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         norm_num_groups=8, cross_attention_dim=24, attention_head_dim=2),
                size=8, ctx=(5, 24)),
    # SD 2.x-like: linear projections, per-block head counts, upcast, inpainting in_channels=9,
    # an odd sample size (upsampling to the skip sizes), a key mask, and an
    # unCLIP-style projected class embedding concatenated to the time embedding
    "sd2_inpaint": dict(cfg=dict(sample_size=9, in_channels=9, out_channels=4, block_out_channels=(16, 32),
                                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                 layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                                 attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                                 flip_sin_to_cos=False, freq_shift=1, class_embed_type="projection",
                                 projection_class_embeddings_input_dim=7, class_embeddings_concat=True),
                        size=9, ctx=(6, 16), mask=True, labels="proj7"),
    # two transformer layers per block, only_cross_attention in the first block, SDXL-style text_time
    # added embedding, LCM-style timestep_cond, scale_shift resnets, time_embedding_act_fn and
    # timestep_post_act, class
    # labels, a text projection of the encoder states, a mid block without attention, 5x5 convs
    "xl_tl2_onlycross": dict(cfg=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                      layers_per_block=(1, 2), norm_num_groups=8, cross_attention_dim=16,
                                      attention_head_dim=(1, 2), transformer_layers_per_block=2,
                                      only_cross_attention=(True, False), use_linear_projection=True,
                                      addition_embed_type="text_time", addition_time_embed_dim=4,
                                      projection_class_embeddings_input_dim=4 * 2 + 12, time_cond_proj_dim=6,
                                      resnet_time_scale_shift="scale_shift", time_embedding_act_fn="silu",
                                      timestep_post_act="mish", num_class_embeds=3, encoder_hid_dim=10,
                                      encoder_hid_dim_type="text_proj", mid_block_type="UNetMidBlock2D",
                                      conv_in_kernel=5, conv_out_kernel=5),
                             size=8, ctx=(4, 10), text_time=(12, 2), tcond=6, labels="int"),
}


def _inputs(spec, in_channels, rng, batch=2):
    size = spec["size"]
    x = rng.standard_normal((batch, size, size, in_channels)).astype(np.float32)
    t = np.array([3.5, 780.0], np.float32)
    if spec.get("positive_t"):  # Fourier features of log(sigma)
        t = np.array([0.05, 2.5], np.float32)
    elif spec.get("int_t"):  # a learned embedding table
        t = np.array([3, 780], np.int64)
    return x, t


def _check_config_roundtrip(folder, cfg):
    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f)
    for k, v in cfg.items():
        want = list(v) if isinstance(v, tuple) else v
        assert saved[k] == want, k


# ---- UNet2DModel ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(UNET2D))
def test_unet2d_parity_both_directions(name, tmp_path_factory):
    spec = UNET2D[name]
    cfg = spec["cfg"]
    rng = np.random.default_rng(1)
    pt = randomize(diffusers.UNet2DModel(**cfg), seed=2)
    folder = str(tmp_path_factory.mktemp(f"u2d_{name}_pt"))
    pt.save_pretrained(folder)

    module, params = jaxgen.load_pretrained(folder)
    assert type(module).__name__ == "UNet2DModel"
    x, t = _inputs(spec, cfg["in_channels"], rng)
    labels = {"int": np.array([1, 4], np.int64), None: None,
              "vec64": rng.standard_normal((2, 64)).astype(np.float32)}[spec["labels"]]
    fwd = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, class_labels=y))
    jl = None if labels is None else jnp.asarray(labels)

    with torch.no_grad():
        ref = nhwc(pt(nchw(x), torch.from_numpy(t), class_labels=None if labels is None else
                      torch.from_numpy(labels)).sample)
    ours = fwd(params, jnp.asarray(x), jnp.asarray(t), jl)
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    err = rel_err(ours, ref)
    assert err <= TOL, f"{name}: diffusers -> jaxgen rel. error {err:.2e}"

    # jaxgen -> diffusers with new weights
    new = perturbed(params, 3)
    out_folder = str(tmp_path_factory.mktemp(f"u2d_{name}_jx"))
    jaxgen.save_pretrained(module, new, out_folder)
    _check_config_roundtrip(out_folder, cfg)
    pt2 = diffusers.UNet2DModel.from_pretrained(out_folder).eval()
    with torch.no_grad():
        ref2 = nhwc(pt2(nchw(x), torch.from_numpy(t), class_labels=None if labels is None else
                        torch.from_numpy(labels)).sample)
    err2 = rel_err(fwd(new, jnp.asarray(x), jnp.asarray(t), jl), ref2)
    assert err2 <= TOL, f"{name}: jaxgen -> diffusers rel. error {err2:.2e}"
    assert rel_err(ref2, ref) > 1e-4  # the new weights really are new
    print(f"UNet2DModel[{name}]: diffusers->jaxgen {err:.2e}, jaxgen->diffusers {err2:.2e}")


# ---- UNet2DConditionModel ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(COND))
def test_unet2d_condition_parity_both_directions(name, tmp_path_factory):
    spec = COND[name]
    cfg = spec["cfg"]
    rng = np.random.default_rng(4)
    pt = randomize(diffusers.UNet2DConditionModel(**cfg), seed=5)
    folder = str(tmp_path_factory.mktemp(f"u2dc_{name}_pt"))
    pt.save_pretrained(folder)
    module, params = jaxgen.load_pretrained(folder)
    assert type(module).__name__ == "UNet2DConditionModel"

    x, t = _inputs(spec, cfg["in_channels"], rng)
    ctx = rng.standard_normal((2, *spec["ctx"])).astype(np.float32)
    kw_np, kw_pt = {}, {}
    if spec.get("labels") == "int":
        kw_np["class_labels"] = np.array([2, 0], np.int64)
    elif spec.get("labels") == "proj7":
        kw_np["class_labels"] = rng.standard_normal((2, 7)).astype(np.float32)
    if "class_labels" in kw_np:
        kw_pt["class_labels"] = torch.from_numpy(kw_np["class_labels"])
    if spec.get("mask"):
        mask = np.ones((2, spec["ctx"][0]), bool)
        mask[0, 3:] = False
        kw_np["encoder_attention_mask"] = mask
        kw_pt["encoder_attention_mask"] = torch.from_numpy(mask.astype(np.float32))
    if spec.get("text_time"):
        d, k = spec["text_time"]
        added = {"text_embeds": rng.standard_normal((2, d)).astype(np.float32),
                 "time_ids": rng.uniform(0, 64, (2, k)).astype(np.float32)}
        kw_np["added_cond_kwargs"] = added
        kw_pt["added_cond_kwargs"] = {k_: torch.from_numpy(v) for k_, v in added.items()}
    if spec.get("tcond"):
        kw_np["timestep_cond"] = rng.standard_normal((2, spec["tcond"])).astype(np.float32)
        kw_pt["timestep_cond"] = torch.from_numpy(kw_np["timestep_cond"])

    kw_j = jax.tree_util.tree_map(jnp.asarray, kw_np)
    fwd = jax.jit(lambda p, x, t, c, kw: module.apply({"params": p}, x, t, c, **kw))
    with torch.no_grad():
        ref = nhwc(pt(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw_pt).sample)
    ours = fwd(params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), kw_j)
    assert ours.shape == ref.shape == (2, spec["size"], spec["size"], cfg["out_channels"])
    err = rel_err(ours, ref)
    assert err <= TOL, f"{name}: diffusers -> jaxgen rel. error {err:.2e}"

    new = perturbed(params, 6)
    out_folder = str(tmp_path_factory.mktemp(f"u2dc_{name}_jx"))
    jaxgen.save_pretrained(module, new, out_folder)
    _check_config_roundtrip(out_folder, cfg)
    pt2 = diffusers.UNet2DConditionModel.from_pretrained(out_folder).eval()
    with torch.no_grad():
        ref2 = nhwc(pt2(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw_pt).sample)
    err2 = rel_err(fwd(new, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), kw_j), ref2)
    assert err2 <= TOL, f"{name}: jaxgen -> diffusers rel. error {err2:.2e}"
    assert rel_err(ref2, ref) > 1e-4
    print(f"UNet2DConditionModel[{name}]: diffusers->jaxgen {err:.2e}, jaxgen->diffusers {err2:.2e}")


# ---- config handling -----------------------------------------------------------------------------
def test_unsupported_config_values_name_the_field():
    from jaxgen.nn.unet import UNet2DConditionModel, UNet2DModel

    with pytest.raises(ConfigError, match="down_block_types"):
        UNet2DModel.from_pt_config({"_class_name": "UNet2DModel", "down_block_types": ["SkipDownBlock2D"]})
    with pytest.raises(ConfigError, match="dual_cross_attention"):
        UNet2DConditionModel.from_pt_config({"dual_cross_attention": True})
    with pytest.raises(ConfigError, match="addition_embed_type"):
        UNet2DConditionModel.from_pt_config({"addition_embed_type": "image"})
    # unknown (newer / other-class) fields are ignored with a warning; runtime fields stay out of config.json
    with pytest.warns(UserWarning, match="some_future_field"):
        m = UNet2DConditionModel.from_pt_config({"some_future_field": 1, "attention_head_dim": [2, 4, 8, 8]},
                                                dtype=jnp.bfloat16, attention_impl="auto")
    assert m.dtype == jnp.bfloat16 and m.attention_head_dim == (2, 4, 8, 8)
    cfg = m.pt_config()
    assert not set(cfg) & {"dtype", "param_dtype", "attention_impl"}
    # num_attention_heads (which diffusers refuses) is written as attention_head_dim, its reading
    cfg = UNet2DConditionModel(num_attention_heads=3).pt_config()
    assert cfg["attention_head_dim"] == 3 and cfg["num_attention_heads"] is None


def test_bad_inputs_are_data_errors():
    from jaxgen.nn.unet import UNet2DModel, _batch_timesteps

    assert _batch_timesteps(17, 3).tolist() == [17, 17, 17]
    assert _batch_timesteps(jnp.array([2.5]), 2).tolist() == [2.5, 2.5]
    with pytest.raises(DataError, match="timestep"):
        _batch_timesteps(jnp.ones(3), 2)

    m = UNet2DModel(block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                    up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    with pytest.raises(DataError, match="NHWC"):
        jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 3, 8, 8)), 1))
    with pytest.raises(DataError, match="multiples of 2"):
        jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 7, 8, 3)), 1))
    with pytest.raises(DataError, match="class embedding"):
        jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), 1, class_labels=jnp.ones(1)))


def test_bf16_compute_dtype_and_params():
    from jaxgen.nn.unet import UNet2DConditionModel

    m = UNet2DConditionModel(block_out_channels=(16, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                             norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2, dtype=jnp.bfloat16)
    args, kw = m.dummy_inputs()
    variables = jax.eval_shape(lambda: m.init(jax.random.key(0), *args, **kw))
    assert {p.dtype for p in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(lambda v: m.apply(v, *args, **kw), variables)
    assert out.shape == args[0].shape and out.dtype == jnp.float32  # the sample's dtype
