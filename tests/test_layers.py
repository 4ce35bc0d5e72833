"""jaxgen.nn.layers against the diffusers building blocks they reproduce (float32, rel. err <= 1e-5).

The cases here are the ones the U-Net parity tests (tests/test_unet_parity.py) do not reach:
VAE-style blocks without a time embedding, pooling, odd output sizes, masks, GELU feed-forwards.

Each diffusers module gets random weights everywhere (no zero-initialised layer hides a mistake);
the weights reach the Flax module through jaxgen.convert.tables, the same rule load_pretrained uses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from jaxgen.convert import tables  # noqa: E402
from jaxgen.nn import layers  # noqa: E402
from jaxgen.convert.testing import randomize_torch as randomize  # noqa: E402
from helpers import nchw, nhwc, rel_err  # noqa: E402

TOL = 1e-5


def to_flax(model, flax_module, *args, **kwargs):
    """The Flax params of ``flax_module`` filled from ``model``'s state dict (strict)."""
    abstract = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), *args, **kwargs))["params"]
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return jax.tree_util.tree_map(jnp.asarray, tables.torch_to_flax(state, abstract, owner=type(model).__name__))


def run(module, params, *args):
    """module.apply under one jit (one compilation instead of one per primitive)."""
    static = tuple(i for i, a in enumerate(args) if isinstance(a, tuple))
    return jax.jit(lambda p, *a: module.apply({"params": p}, *a), static_argnums=tuple(i + 1 for i in static))(
        params, *args)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("dim,flip,shift,scale", [(32, False, 1, 1), (33, True, 1, 1), (320, True, 0, 2.5)])
def test_timestep_embedding(dim, flip, shift, scale):
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17, 250.5, 999], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift,
                                 scale=scale).numpy()
    ours = layers.get_timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift,
                                         scale=scale)
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    assert rel_err(ours, ref) <= TOL
    # torch's float32 exp may be 1 ulp off a frequency: at most ~2 ulp of the largest argument t*scale
    assert np.max(np.abs(np.asarray(ours) - ref)) <= 2.5e-7 * t.max() * scale


def test_timestep_embedding_mlp_and_fourier(rng):
    from diffusers.models.embeddings import GaussianFourierProjection, TimestepEmbedding

    pt = randomize(TimestepEmbedding(16, 64, act_fn="silu", cond_proj_dim=8, post_act_fn="mish"))
    ours = layers.TimestepEmbedding(64, act_fn="silu", cond_proj_dim=8, post_act_fn="mish")
    x, c = rng.standard_normal((3, 16), np.float32), rng.standard_normal((3, 8), np.float32)
    params = to_flax(pt, ours, jnp.asarray(x), jnp.asarray(c))
    ref = pt(torch.from_numpy(x), torch.from_numpy(c)).detach().numpy()
    assert rel_err(run(ours, params, x, c), ref) <= TOL
    # init without a condition still creates cond_proj (the weights exist in the file)
    assert "cond_proj" in jax.eval_shape(lambda: ours.init(jax.random.key(0), jnp.asarray(x)))["params"]

    pt = GaussianFourierProjection(8, scale=16).eval()
    ours = layers.GaussianFourierProjection(8, scale=16)
    sigma = np.array([0.01, 0.5, 3.0], np.float32)
    params = to_flax(pt, ours, jnp.asarray(sigma))
    ref = pt(torch.from_numpy(sigma)).detach().numpy()
    assert rel_err(run(ours, params, sigma), ref) <= TOL


RESNET_CASES = {
    "vae_no_temb": dict(pt=dict(in_channels=8, out_channels=8, temb_channels=None, groups=4, eps=1e-6),
                        jx=dict(out_channels=8, groups=4, eps=1e-6), temb=False),
    "up": dict(pt=dict(in_channels=8, out_channels=8, temb_channels=12, groups=4, up=True),
               jx=dict(out_channels=8, groups=4, up=True), temb=True),
    "down_gelu": dict(pt=dict(in_channels=8, out_channels=12, temb_channels=12, groups=4, down=True,
                              non_linearity="gelu"),
                      jx=dict(out_channels=12, groups=4, down=True, non_linearity="gelu"), temb=True),
}


@pytest.mark.parametrize("case", sorted(RESNET_CASES))
def test_resnet_block(case, rng):
    from diffusers.models.resnet import ResnetBlock2D

    spec = RESNET_CASES[case]
    pt = randomize(ResnetBlock2D(**spec["pt"]), seed=1)
    ours = layers.ResnetBlock2D(**spec["jx"])
    x = rng.standard_normal((2, 6, 6, spec["pt"]["in_channels"]), np.float32)
    temb = rng.standard_normal((2, 12), np.float32) if spec["temb"] else None
    params = to_flax(pt, ours, jnp.asarray(x), None if temb is None else jnp.asarray(temb))
    ref = nhwc(pt(nchw(x), None if temb is None else torch.from_numpy(temb)))
    out = run(ours, params, x, temb)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("padding,use_conv", [(0, True), (1, False)])
def test_downsample(padding, use_conv, rng):
    from diffusers.models.downsampling import Downsample2D

    pt = randomize(Downsample2D(8, use_conv=use_conv, out_channels=8, padding=padding, name="op"), seed=2)
    ours = layers.Downsample2D(8, use_conv=use_conv, padding=padding)
    x = rng.standard_normal((2, 7 if use_conv else 8, 8, 8), np.float32)
    params = to_flax(pt, ours, jnp.asarray(x)) if use_conv else {}
    ref = nhwc(pt(nchw(x)))
    out = run(ours, params, x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("output_size", [(7, 9)])
def test_upsample(output_size, rng):
    from diffusers.models.upsampling import Upsample2D

    pt = randomize(Upsample2D(8, use_conv=True, out_channels=6), seed=3)
    ours = layers.Upsample2D(6, use_conv=True)
    x = rng.standard_normal((2, 4, 5, 8), np.float32)
    params = to_flax(pt, ours, jnp.asarray(x))
    ref = nhwc(pt(nchw(x), output_size))
    out = run(ours, params, x, output_size)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL


def test_attention_spatial_and_cross(rng):
    from diffusers.models.attention_processor import Attention

    # spatial self-attention as in AttnDownBlock2D / the VAE mid block
    pt = randomize(Attention(16, heads=4, dim_head=4, norm_num_groups=4, eps=1e-5, residual_connection=True,
                             bias=True, upcast_softmax=True, rescale_output_factor=2.0), seed=4)
    ours = layers.Attention(heads=4, dim_head=4, norm_num_groups=4, eps=1e-5, residual_connection=True,
                            bias=True, rescale_output_factor=2.0)
    x = rng.standard_normal((2, 4, 5, 16), np.float32)
    params = to_flax(pt, ours, jnp.asarray(x))
    ref = nhwc(pt(nchw(x)))
    assert rel_err(run(ours, params, x), ref) <= TOL

    # cross-attention with a key mask
    pt = randomize(Attention(16, cross_attention_dim=12, heads=2, dim_head=8), seed=5)
    ours = layers.Attention(heads=2, dim_head=8)
    x, ctx = rng.standard_normal((2, 10, 16), np.float32), rng.standard_normal((2, 7, 12), np.float32)
    mask = np.ones((2, 7), bool)
    mask[1, 4:] = False
    params = to_flax(pt, ours, jnp.asarray(x), jnp.asarray(ctx))
    bias = torch.from_numpy(np.where(mask, 0.0, -10000.0).astype(np.float32))[:, None, :]  # as diffusers
    ref = pt(torch.from_numpy(x), torch.from_numpy(ctx), attention_mask=bias).detach().numpy()
    assert rel_err(run(ours, params, x, ctx, mask), ref) <= TOL


@pytest.mark.parametrize("linear,only_cross,layers_n,act", [(False, True, 2, "gelu")])
def test_transformer2d(linear, only_cross, layers_n, act, rng):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    pt = randomize(Transformer2DModel(2, 8, in_channels=16, num_layers=layers_n, cross_attention_dim=12,
                                      norm_num_groups=4, use_linear_projection=linear,
                                      only_cross_attention=only_cross, activation_fn=act), seed=6)
    ours = layers.Transformer2DModel(2, 8, num_layers=layers_n, cross_attention_dim=12, norm_num_groups=4,
                                     use_linear_projection=linear, only_cross_attention=only_cross,
                                     activation_fn=act)
    x, ctx = rng.standard_normal((2, 4, 4, 16), np.float32), rng.standard_normal((2, 5, 12), np.float32)
    params = to_flax(pt, ours, jnp.asarray(x), jnp.asarray(ctx))
    ref = nhwc(pt(nchw(x), encoder_hidden_states=torch.from_numpy(ctx)).sample)
    assert rel_err(run(ours, params, x, ctx), ref) <= TOL


@pytest.mark.parametrize("temb,shift", [(False, "default")])
def test_mid_block(temb, shift, rng):
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

    pt = randomize(UNetMidBlock2D(16, 12 if temb else None, resnet_groups=4, resnet_eps=1e-6,
                                  attention_head_dim=16 if not temb else 4, resnet_time_scale_shift=shift,
                                  output_scale_factor=1.5), seed=7)
    ours = layers.UNetMidBlock2D(resnet_groups=4, resnet_eps=1e-6, attention_head_dim=16 if not temb else 4,
                                 resnet_time_scale_shift=shift, output_scale_factor=1.5)
    x = rng.standard_normal((2, 4, 4, 16), np.float32)
    t = rng.standard_normal((2, 12), np.float32) if temb else None
    params = to_flax(pt, ours, jnp.asarray(x), None if t is None else jnp.asarray(t))
    ref = nhwc(pt(nchw(x), None if t is None else torch.from_numpy(t)))
    assert rel_err(run(ours, params, x, t), ref) <= TOL


def test_bf16_compute_keeps_float32_params():
    block = layers.ResnetBlock2D(out_channels=16, groups=4, dtype=jnp.bfloat16)
    x, temb = jax.ShapeDtypeStruct((1, 4, 4, 8), jnp.float32), jax.ShapeDtypeStruct((1, 12), jnp.float32)
    variables = jax.eval_shape(lambda a, t: block.init(jax.random.key(0), a, t), x, temb)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    assert jax.eval_shape(block.apply, variables, x, temb).dtype == jnp.bfloat16
