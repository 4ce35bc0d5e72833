"""AutoencoderKL against diffusers, both directions, float32, relative error <= 1e-5.

For each small config: diffusers builds the model, every weight is randomised (diffusers
zero-inits nothing here, but its norms start at 1/0), save_pretrained writes a folder,
jaxgen.load_pretrained reads it, and encode (posterior mean and log-variance), decode and the
full forward (decode of the posterior mode) must equal diffusers'. Then jaxgen.save_pretrained
writes perturbed weights and diffusers' from_pretrained must give jaxgen's outputs.
One jit per config; the reverse direction reuses it with the new parameters.
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
from jaxgen.errors import ConfigError, DataError  # noqa: E402
from jaxgen.nn.gaussian import DiagonalGaussian  # noqa: E402
from jaxgen.convert.testing import randomize_torch as randomize  # noqa: E402
from helpers import nchw, nhwc, perturbed, rel_err  # noqa: E402

TOL = 1e-5


def random_params(module, *args, seed: int = 0):
    """Random parameters with the module's shapes, drawn on the host (jitting module.init costs
    seconds of compile for its truncated-normal initialisers)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) / max(1, np.prod(s.shape[:-1])) ** 0.5),
        shapes)


def check_config_roundtrip(folder, cfg):
    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f)
    for k, v in cfg.items():
        assert saved[k] == (list(v) if isinstance(v, tuple) else v), k
    assert not set(saved) & {"dtype", "param_dtype", "attention_impl"}


ENC, DEC = "DownEncoderBlock2D", "UpDecoderBlock2D"
CONFIGS = {
    # one level (no resampling), quant convs, mid attention, 4 latent channels
    "1level_quant": dict(cfg=dict(in_channels=3, out_channels=3, down_block_types=(ENC,), up_block_types=(DEC,),
                                  block_out_channels=(16,), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4),
                         hw=(6, 6), recon=True),
    # two levels, two resnets per level (three in the decoder), 8 latent channels, no quant convs,
    # a non-square image, SD-XL-like metadata fields
    "2level_noquant": dict(cfg=dict(in_channels=3, out_channels=3, down_block_types=(ENC,) * 2,
                                    up_block_types=(DEC,) * 2, block_out_channels=(8, 16), layers_per_block=2,
                                    latent_channels=8, norm_num_groups=4, use_quant_conv=False,
                                    use_post_quant_conv=False, scaling_factor=0.13025, force_upcast=False,
                                    shift_factor=0.0609),
                           hw=(8, 12)),
    # three levels, no mid-block attention, GELU resnets (conv_act stays SiLU), 2 -> 1 channels
    "3level_noattn_gelu": dict(cfg=dict(in_channels=2, out_channels=1, down_block_types=(ENC,) * 3,
                                        up_block_types=(DEC,) * 3, block_out_channels=(8, 8, 16),
                                        layers_per_block=1, latent_channels=4, norm_num_groups=2, act_fn="gelu",
                                        mid_block_add_attention=False, latents_mean=(0.1, -0.2, 0.3, 0.0),
                                        latents_std=(1.0, 2.0, 0.5, 1.5)),
                               hw=(8, 8)),
}


def _torch_outputs(pt, x, z, recon: bool):
    with torch.no_grad():
        post = pt.encode(nchw(x)).latent_dist
        out = dict(mean=nhwc(post.mean), logvar=nhwc(post.logvar), dec=nhwc(pt.decode(nchw(z)).sample))
        if recon:
            out["recon"] = nhwc(pt(nchw(x)).sample)
        return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_autoencoder_kl_parity_both_directions(name, tmp_path_factory):
    spec = CONFIGS[name]
    cfg = spec["cfg"]
    pt = randomize(diffusers.AutoencoderKL(**cfg), seed=2)
    folder = str(tmp_path_factory.mktemp(f"vae_{name}_pt"))
    pt.save_pretrained(folder)
    module, params = jaxgen.load_pretrained(folder)
    assert type(module).__name__ == "AutoencoderKL"

    rng = np.random.default_rng(1)
    h, w = spec["hw"]
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    x = rng.uniform(-1, 1, (2, h, w, cfg["in_channels"])).astype(np.float32)
    z = rng.standard_normal((2, h // f, w // f, cfg["latent_channels"])).astype(np.float32)

    @jax.jit
    def run(p, x, z):
        v = {"params": p}
        post = module.apply(v, x, method="encode")
        out = dict(mean=post.mean, logvar=post.logvar, dec=module.apply(v, z, method="decode"))
        if recon:  # the whole forward (decode of the posterior mode), in one config: it doubles the compile
            out["recon"] = module.apply(v, x)
        return out

    recon = spec.get("recon", False)
    ref = _torch_outputs(pt, x, z, recon)
    ours = run(params, jnp.asarray(x), jnp.asarray(z))
    errs = {}
    for k in ref:
        assert ours[k].shape == ref[k].shape and ours[k].dtype == jnp.float32, k
        errs[k] = rel_err(ours[k], ref[k])
    assert max(errs.values()) <= TOL, f"{name}: diffusers -> jaxgen rel. errors {errs}"

    new = perturbed(params, 3)
    out_folder = str(tmp_path_factory.mktemp(f"vae_{name}_jx"))
    jaxgen.save_pretrained(module, new, out_folder)
    check_config_roundtrip(out_folder, cfg)
    pt2 = diffusers.AutoencoderKL.from_pretrained(out_folder).eval()
    ref2 = _torch_outputs(pt2, x, z, recon)
    ours2 = run(new, jnp.asarray(x), jnp.asarray(z))
    errs2 = {k: rel_err(ours2[k], ref2[k]) for k in ref2}
    assert max(errs2.values()) <= TOL, f"{name}: jaxgen -> diffusers rel. errors {errs2}"
    assert rel_err(ref2["dec"], ref["dec"]) > 1e-4  # the new weights really are new
    fmt = lambda e: ", ".join(f"{k} {v:.1e}" for k, v in e.items())  # noqa: E731
    print(f"AutoencoderKL[{name}]: diffusers->jaxgen {fmt(errs)} | jaxgen->diffusers {fmt(errs2)}")


def test_posterior_sampling_kl_and_bf16():
    """sample_posterior draws mean + std * eps from the key; return_posterior gives the KL; bf16 runs."""
    from jaxgen.nn.vae import AutoencoderKL

    module = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    params = random_params(module, x)

    @jax.jit
    def run(p, x):
        v = {"params": p}
        key = jax.random.key(7)
        post = module.apply(v, x, method="encode")
        out, post2 = module.apply(v, x, key=key, sample_posterior=True, return_posterior=True)
        z = post.mean + jnp.exp(0.5 * post.logvar) * jax.random.normal(key, post.mean.shape)
        return out, module.apply(v, z, method="decode"), post2.kl(), post, module.apply(v, x)

    out, expect, kl, post, rec32 = jax.device_get(run(params, x))
    assert isinstance(post, DiagonalGaussian) and post.mean.shape == (2, 4, 4, 2)
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)
    assert kl.shape == (2,) and np.all(kl > 0)
    with pytest.raises(ValueError, match="key"):
        module.apply({"params": params}, x, sample_posterior=True)

    bf16 = module.clone(dtype=jnp.bfloat16)
    rec16 = jax.jit(lambda p, x: bf16.apply({"params": p}, x))(params, x)
    assert rec16.dtype == jnp.float32  # output in the input's dtype
    assert rel_err(rec16, rec32) < 5e-2


def test_config_errors_name_the_problem():
    from jaxgen.nn.vae import AutoencoderKL

    with pytest.raises(ConfigError, match="down_block_types"):
        AutoencoderKL.from_pt_config({"_class_name": "AutoencoderKL", "down_block_types": ["AttnDownEncoderBlock2D"]})
    with pytest.raises(ConfigError, match="act_fn"):
        AutoencoderKL.from_pt_config({"act_fn": "tanh"})
    with pytest.warns(UserWarning, match="some_future_field"):
        m = AutoencoderKL.from_pt_config({"some_future_field": 1, "block_out_channels": [8, 16]},
                                         dtype=jnp.bfloat16, attention_impl="auto")
    assert m.dtype == jnp.bfloat16 and m.block_out_channels == (8, 16)
    assert not set(m.pt_config()) & {"dtype", "param_dtype", "attention_impl"}
    bad = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",), norm_num_groups=4)
    with pytest.raises(ConfigError, match="same length"):
        bad.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    good = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4)
    with pytest.raises(DataError, match="NHWC"):
        jax.eval_shape(lambda: good.init(jax.random.key(0), jnp.zeros((1, 3, 4, 4))))
