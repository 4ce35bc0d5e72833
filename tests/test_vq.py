"""Vector quantization: the pure functions' contracts, the VectorQuantizer module (gradient and EMA
codebooks), and VQModel against diffusers in both directions (float32, relative error <= 1e-5)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err, perturbed
from jaxgen.convert.testing import randomize_torch as randomize
from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.vq import (CodebookEMA, VectorQuantizer, codebook_usage, ema_init, ema_reset_codes, ema_update,
                          quantize, restart_dead_codes, update_unused, vq_losses)

TOL = 1e-5


# ------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------
@jax.jit
def _quantize_and_grads(z, codebook, w):
    """z_q, idx, d<w, z_q>/dz, d<w, z_q>/dcodebook, and the Jacobian dz_q/dz of the first vector."""
    z_q, idx = quantize(z, codebook)
    gz, gc = jax.grad(lambda z, c: jnp.sum(w * quantize(z, c)[0]), argnums=(0, 1))(z, codebook)
    jac = jax.jacobian(lambda v: quantize(v, codebook)[0])(z.reshape(-1, z.shape[-1])[0])  # [D, D]
    return z_q, idx, gz, gc, jac


@pytest.mark.parametrize("seed", range(4))
def test_quantize_is_nearest_code_with_identity_gradient(seed):
    """Property: idx is the brute-force nearest code, z_q its value, and jax.grad through quantize is
    the identity on z and zero on the codebook, whatever z, codebook and the cotangent are."""
    rng = np.random.default_rng(seed)
    k, d = 7, 3  # one shape for all seeds: one compile
    z = rng.standard_normal((2, 4, 5, d)).astype(np.float32) * rng.uniform(0.5, 3)
    codebook = rng.standard_normal((k, d)).astype(np.float32)
    w = rng.standard_normal(z.shape).astype(np.float32)
    z_q, idx, gz, gc, jac = jax.device_get(_quantize_and_grads(z, codebook, w))
    dist = ((z[..., None, :].astype(np.float64) - codebook) ** 2).sum(-1)  # [..., K]
    np.testing.assert_array_equal(idx, dist.argmin(-1))
    assert idx.dtype == np.int32 and idx.shape == z.shape[:-1]
    np.testing.assert_allclose(z_q, codebook[idx], atol=1e-6)
    np.testing.assert_array_equal(gz, w)  # straight-through: the cotangent passes unchanged
    np.testing.assert_array_equal(gc, np.zeros_like(codebook))
    np.testing.assert_array_equal(jac, np.eye(d))


def test_vq_losses_values_and_gradient_routing():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 4)).astype(np.float32)
    codes = rng.standard_normal((3, 4)).astype(np.float32)
    mse = np.mean((z - codes) ** 2)

    @jax.jit
    def f(z, codes):
        def terms(z, c, legacy):
            return jnp.stack(vq_losses(z, c, 0.25, legacy=legacy))

        out = {}
        for legacy in (False, True):
            vals = terms(z, codes, legacy)
            jz, jc = jax.jacobian(terms, argnums=(0, 1))(z, codes, legacy)  # [2, 3, 4] each
            out[legacy] = (vals, jz, jc)
        return out

    out = jax.device_get(f(z, codes))
    vals, jz, jc = out[False]
    np.testing.assert_allclose(vals, [mse, 0.25 * mse], rtol=1e-6)
    # codebook loss moves only the codes, commitment only the encoder output
    np.testing.assert_allclose(jc[0], 2 * (codes - z) / z.size, rtol=1e-5)
    np.testing.assert_array_equal(jz[0], 0)
    np.testing.assert_allclose(jz[1], 0.25 * 2 * (z - codes) / z.size, rtol=1e-5)
    np.testing.assert_array_equal(jc[1], 0)
    vals_l, jz_l, jc_l = out[True]  # diffusers' legacy weighting: beta on the codebook term
    np.testing.assert_allclose(vals_l, [0.25 * mse, mse], rtol=1e-6)
    np.testing.assert_array_equal(jz_l[0], 0)
    np.testing.assert_array_equal(jc_l[1], 0)


def test_codebook_usage_on_a_known_histogram():
    idx = np.array([[0, 0, 0, 1], [0, 1, 2, 0]], np.int32)  # counts 5, 2, 1, 0, 0, 0 over K = 6
    used, perplexity = jax.device_get(jax.jit(codebook_usage, static_argnums=1)(idx, 6))
    p = np.array([5, 2, 1]) / 8
    np.testing.assert_allclose(used, 3 / 6)
    np.testing.assert_allclose(perplexity, np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    u1, p1 = jax.device_get(jax.jit(codebook_usage, static_argnums=1)(np.full((2, 4), 3, np.int32), 6))
    assert u1 == pytest.approx(1 / 6) and p1 == pytest.approx(1.0)  # one code: perplexity 1


def test_ema_update_matches_a_hand_computed_case():
    # K = 2 codes in D = 1; z = 1 goes to code 0, z = 3 and 5 to code 1; decay 0.5
    state = CodebookEMA(cluster_size=jnp.array([1.0, 1.0]), embed_sum=jnp.array([[0.0], [2.0]]))
    z = jnp.array([[1.0], [3.0], [5.0]])
    idx = jnp.array([0, 1, 1])
    cb0 = jnp.array([[1.0, -2.0], [0.5, 3.0]])

    @jax.jit
    def run(state, z, idx, cb0):
        plain = ema_update(state, z, idx, decay=0.5, eps=0.0)
        smoothed = ema_update(state, z, idx, decay=0.5, eps=0.1)[1]
        same = ema_update(ema_init(cb0), jnp.zeros((0, 2)), jnp.zeros((0,), jnp.int32), decay=0.9, eps=0.0)[1]
        return plain, smoothed, same

    (new, codebook), smoothed_cb, same = jax.device_get(run(state, z, idx, cb0))
    np.testing.assert_allclose(new.cluster_size, [0.5 + 0.5 * 1, 0.5 + 0.5 * 2])  # [1, 1.5]
    np.testing.assert_allclose(new.embed_sum, [[0.5 * 1], [1 + 0.5 * 8]])  # [[0.5], [5]]
    np.testing.assert_allclose(codebook, [[0.5 / 1.0], [5 / 1.5]], rtol=1e-6)
    # Laplace smoothing: (n_k + eps) / (N + K eps) * N with N = 2.5
    n = np.array([1.0, 1.5])
    np.testing.assert_allclose(smoothed_cb[:, 0], [0.5, 5.0] / ((n + 0.1) / (2.5 + 0.2) * 2.5), rtol=1e-6)
    np.testing.assert_allclose(same, cb0, rtol=1e-6)  # ema_init reproduces its codebook


def test_dead_code_restart():
    codebook = jnp.arange(8.0).reshape(4, 2)
    z = jnp.array([[100.0, 101.0], [200.0, 201.0], [300.0, 301.0]])

    @jax.jit
    def run(codebook, z):
        unused = update_unused(jnp.array([0, 3, 1, 5], jnp.int32), jnp.array([[2, 2], [0, 2]]), 4)  # 0, 2 used
        new_cb, new_unused, restarted = restart_dead_codes(jax.random.key(0), codebook, unused, z, 5)
        return unused, new_cb, new_unused, restarted, ema_reset_codes(ema_init(codebook), new_cb, restarted)

    unused, new_cb, new_unused, restarted, state = jax.device_get(run(codebook, z))
    np.testing.assert_array_equal(unused, [0, 4, 0, 6])
    np.testing.assert_array_equal(restarted, [False, False, False, True])
    np.testing.assert_array_equal(new_unused, [0, 4, 0, 0])
    np.testing.assert_array_equal(new_cb[:3], np.asarray(codebook)[:3])
    assert any(np.array_equal(new_cb[3], row) for row in np.asarray(z))  # a real encoder output
    np.testing.assert_array_equal(state.cluster_size, [1, 1, 1, 1])
    np.testing.assert_array_equal(state.embed_sum, new_cb)


# ------------------------------------------------------------------------------------------------
# VectorQuantizer
# ------------------------------------------------------------------------------------------------
def test_vector_quantizer_gradient_codebook():
    vq = VectorQuantizer(num_embeddings=8, embedding_dim=3, beta=0.25, legacy=True)
    z = np.random.default_rng(0).standard_normal((2, 3, 3, 3)).astype(np.float32) * 0.1

    @jax.jit
    def run(z):
        params = vq.init(jax.random.key(0), z)["params"]

        def loss(p):
            q = vq.apply({"params": p}, z)
            return q.loss, q

        (value, q), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return params, q, grads

    params, q, grads = jax.device_get(run(z))
    cb = params["embedding"]["embedding"]  # diffusers' quantize.embedding.weight inside VQModel
    assert cb.shape == (8, 3) and np.abs(cb).max() <= 1 / 8  # diffusers' uniform(-1/K, 1/K) init
    codes = cb[q.indices]
    mse = np.mean((z - codes) ** 2)
    np.testing.assert_allclose(q.loss, mse + 0.25 * mse, rtol=1e-5)  # diffusers' legacy commit_loss
    used = np.zeros(8, bool)
    used[np.unique(q.indices)] = True
    g = grads["embedding"]["embedding"]
    assert np.all(np.abs(g[used]).sum(-1) > 0) and np.all(g[~used] == 0)  # only used codes move


def test_vector_quantizer_ema_module():
    k, d = 6, 2
    vq = VectorQuantizer(num_embeddings=k, embedding_dim=d, use_ema=True, ema_decay=0.8, ema_epsilon=1e-3,
                         dead_code_threshold=2)
    rng = np.random.default_rng(1)
    z1 = rng.standard_normal((4, 5, d)).astype(np.float32)
    z2 = rng.standard_normal((4, 5, d)).astype(np.float32)

    @jax.jit
    def run(z1, z2):
        v = vq.init(jax.random.key(0), z1)
        q1, s1 = vq.apply(v, z1, train=True, key=jax.random.key(1), mutable=["vq_ema"])
        q2, s2 = vq.apply({**v, **s1}, z2, train=True, key=jax.random.key(2), mutable=["vq_ema"])
        e = v["vq_ema"]  # the pure functions, for reference
        ref1 = ema_update(CodebookEMA(e["cluster_size"], e["embed_sum"]), z1, q1.indices, 0.8, 1e-3)
        ref_unused = update_unused(e["unused"], q1.indices, k)
        ref_idx2 = quantize(z2, s1["vq_ema"]["embedding"])[1]
        return v, q1, s1, q2, s2, ref1, ref_unused, ref_idx2

    v, q1, s1, q2, s2, (state, cb), unused, ref_idx2 = jax.device_get(run(z1, z2))
    assert "params" not in v or not v["params"]  # the EMA codebook is state, not a parameter
    ema0 = v["vq_ema"]
    assert set(ema0) == {"embedding", "cluster_size", "embed_sum", "unused"}
    # step 1 equals the pure functions
    assert int(np.max(unused)) < 2  # nothing restarted at step 1
    np.testing.assert_allclose(s1["vq_ema"]["embedding"], cb, rtol=1e-6)
    np.testing.assert_allclose(s1["vq_ema"]["cluster_size"], state.cluster_size, rtol=1e-6)
    np.testing.assert_array_equal(s1["vq_ema"]["unused"], unused)
    # step 2 quantizes with the step-1 codebook, then restarts codes unused twice from z2's rows
    np.testing.assert_array_equal(q2.indices, ref_idx2)
    dead = (np.asarray(unused) + 1 >= 2) & ~np.isin(np.arange(k), q2.indices)
    rows = z2.reshape(-1, d)
    for c in np.flatnonzero(dead):
        assert any(np.allclose(s2["vq_ema"]["embedding"][c], r) for r in rows)
        assert s2["vq_ema"]["unused"][c] == 0 and s2["vq_ema"]["cluster_size"][c] == 1
    np.testing.assert_allclose(q1.loss, 0.25 * np.mean((z1 - ema0["embedding"][q1.indices]) ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="mutable"):
        vq.apply(v, z1, train=True, key=jax.random.key(1))
    with pytest.raises(ValueError, match="key"):
        vq.apply(v, z1, train=True, mutable=["vq_ema"])


# ------------------------------------------------------------------------------------------------
# VQModel against diffusers
# ------------------------------------------------------------------------------------------------
ENC, DEC = "DownEncoderBlock2D", "UpDecoderBlock2D"
VQ_CONFIGS = {
    # group norms, codebook dim 6 != latent 4, two resnets per level, no mid attention, GELU
    "group_embed6": dict(cfg=dict(in_channels=3, out_channels=2, down_block_types=(ENC,) * 2,
                                  up_block_types=(DEC,) * 2, block_out_channels=(8, 16), layers_per_block=2,
                                  latent_channels=4, vq_embed_dim=6, num_vq_embeddings=16, norm_num_groups=4,
                                  mid_block_add_attention=False, act_fn="gelu", scaling_factor=0.5),
                         hw=(8, 8)),
    # MoVQ: spatial norms conditioned on the codes, mid attention, decoding from code indices
    "spatial_lookup": dict(cfg=dict(in_channels=3, out_channels=3, down_block_types=(ENC,) * 2,
                                    up_block_types=(DEC,) * 2, block_out_channels=(32, 32), layers_per_block=1,
                                    latent_channels=3, num_vq_embeddings=12, norm_num_groups=8,
                                    norm_type="spatial", lookup_from_codebook=True),
                           hw=(4, 6), recon=True),
}



def check_config_roundtrip(folder, cfg):
    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f)
    for k, v in cfg.items():
        assert saved[k] == (list(v) if isinstance(v, tuple) else v), k
    assert not set(saved) & {"dtype", "param_dtype", "attention_impl"}


def _torch_vq(pt, torch, x, h, idx, recon):
    from_nhwc = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))  # noqa
    to_nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    with torch.no_grad():
        out = {"h": to_nhwc(pt.encode(from_nhwc(x)).latents)}
        dec = pt.decode(from_nhwc(h))
        out["dec"], out["loss"] = to_nhwc(dec.sample), dec.commit_loss.numpy()
        out["idx"] = pt.quantize(from_nhwc(h))[2][2].numpy().reshape(h.shape[:-1])
        if recon:
            out["recon"] = to_nhwc(pt(from_nhwc(x)).sample)
        if pt.config.lookup_from_codebook:
            shape = (*idx.shape, pt.config.vq_embed_dim or pt.config.latent_channels)
            out["dec_codes"] = to_nhwc(pt.decode(torch.from_numpy(idx.astype(np.int64)), force_not_quantize=True,
                                                 shape=shape).sample)
        else:
            out["dec_nq"] = to_nhwc(pt.decode(from_nhwc(h), force_not_quantize=True).sample)
    return out


@pytest.mark.parametrize("name", sorted(VQ_CONFIGS))
def test_vqmodel_parity_both_directions(name, tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    import jaxgen

    spec = VQ_CONFIGS[name]
    cfg = spec["cfg"]
    pt = randomize(diffusers.VQModel(**cfg), seed=4)
    folder = str(tmp_path_factory.mktemp(f"vq_{name}_pt"))
    pt.save_pretrained(folder)
    module, params = jaxgen.load_pretrained(folder)
    assert type(module).__name__ == "VQModel"

    rng = np.random.default_rng(5)
    hh, ww = spec["hw"]
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    x = rng.uniform(-1, 1, (2, hh * f, ww * f, cfg["in_channels"])).astype(np.float32)
    lookup = cfg.get("lookup_from_codebook", False)
    recon = spec.get("recon", False)

    @jax.jit
    def run(p, x, h, idx):
        v = {"params": p}
        q = module.apply(v, h, method="quantize_latents")
        out = dict(h=module.apply(v, x, method="encode"), dec=module.apply(v, h, method="decode"),
                   loss=q.loss, idx=q.indices)
        if recon:  # the whole forward, in one config: it doubles the compile
            out["recon"] = module.apply(v, x)
        if lookup:
            out["dec_codes"] = module.apply(v, idx, force_not_quantize=True, method="decode")
        else:
            out["dec_nq"] = module.apply(v, h, force_not_quantize=True, method="decode")
        return out

    def compare(pt_model, p, tag):
        with torch.no_grad():  # the reference latents feed both decoders
            h_ref = pt_model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).latents.numpy()
        h_ref = h_ref.transpose(0, 2, 3, 1)
        idx = rng.integers(0, cfg["num_vq_embeddings"], h_ref.shape[:-1]).astype(np.int32)
        ref = _torch_vq(pt_model, torch, x, h_ref, idx, recon)
        ours = jax.device_get(run(p, x, h_ref, idx))
        np.testing.assert_array_equal(ours["idx"], ref["idx"])
        errs = {k: rel_err(ours[k], ref[k]) for k in ref if k != "idx"}
        assert max(errs.values()) <= TOL, f"{name}: {tag} rel. errors {errs}"
        return errs, ref

    errs, ref = compare(pt, params, "diffusers -> jaxgen")
    new = perturbed(params, 6)
    out_folder = str(tmp_path_factory.mktemp(f"vq_{name}_jx"))
    jaxgen.save_pretrained(module, new, out_folder)
    check_config_roundtrip(out_folder, cfg)
    pt2 = diffusers.VQModel.from_pretrained(out_folder).eval()
    errs2, ref2 = compare(pt2, new, "jaxgen -> diffusers")
    assert rel_err(ref2["dec"], ref["dec"]) > 1e-4
    fmt = lambda e: ", ".join(f"{k} {v:.1e}" for k, v in e.items())  # noqa: E731
    print(f"VQModel[{name}]: diffusers->jaxgen {fmt(errs)} | jaxgen->diffusers {fmt(errs2)}")


def test_vqmodel_config_errors(tmp_path):
    from jaxgen.nn.vq import VQModel

    with pytest.raises(ConfigError, match="norm_type"):
        VQModel.from_pt_config({"_class_name": "VQModel", "norm_type": "ada_group"})
    m = VQModel(block_out_channels=(32,), latent_channels=3, vq_embed_dim=4, norm_type="spatial")
    with pytest.raises(ConfigError, match="vq_embed_dim"):
        jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 2, 2, 3)))
    m = VQModel(block_out_channels=(8,), norm_num_groups=4, lookup_from_codebook=True)
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 2, 2, 3)))
    assert shapes["params"]["quantize"]["embedding"]["embedding"].shape == (256, 3)
    with pytest.raises(DataError, match="int code indices"):
        jax.eval_shape(lambda p: m.apply(p, jnp.zeros((1, 2, 2, 3)), force_not_quantize=True, method="decode"),
                       shapes)
    assert json.loads(json.dumps(m.pt_config()))["_class_name"] == "VQModel"
    assert not os.listdir(tmp_path)
