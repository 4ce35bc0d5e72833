"""Attention control inside the compiled loop and Prompt-to-Prompt editing.

A tiny random diffusers Stable Diffusion pipeline (tests/helpers.py tiny_sd_components and a
two-level U-Net with cross-attention at 8x8 and 4x4; 16x16 images, 8x8x4 latents, 2 DDIM steps)
is saved by diffusers and loaded by jaxgen. What is checked:

* without a controller the U-Net lowers to the same program, and an identity controller gives
  the uncontrolled output bit for bit; the controller sees every attention layer, in order;
* the controller's edits on synthetic probabilities (replace, per-word schedules, self-attention
  windows and size limit, refine's token alignment, reweight's equalizer, the stored maps);
* through the pipeline: no injection = plain sampling of each prompt, equal prompts with full
  injection = the source, local blend with an empty mask = the source and with a full mask =
  no blend, changing the fractions does not recompile; attention-map shapes and sums;
* the run-level ability on the shared tiny latent-diffusion run, the PNG writers, bad input.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jaxgen  # noqa: E402
from jaxgen.convert.testing import randomize_torch  # noqa: E402
from jaxgen.errors import DataError  # noqa: E402
from jaxgen.nn.attention_control import AttentionController, IdentityController, apply_controlled  # noqa: E402
from jaxgen.pipelines import prompt_to_prompt as p2p  # noqa: E402
from helpers import tiny_sd_components, unit_noise  # noqa: E402

STEPS, G = 2, 7.5
A = "a large red circle on the left"
B = "a large blue circle on the left"
LAT = unit_noise(0, (1, 8, 8, 4))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("p2p")
    unet = randomize_torch(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4), 5)
    path = str(root / "sd")
    diffusers.StableDiffusionPipeline(unet=unet, **tiny_sd_components(root)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    return jaxgen.StableDiffusionPipeline.from_pretrained(folder)


def edit(pipe, a, b, **kw):
    kw = {"num_inference_steps": STEPS, "guidance_scale": G, "latents": LAT, **kw}
    return pipe.prompt_to_prompt(a, b, **kw)


@pytest.fixture(scope="module")
def plain(pipe):
    """Plain sampling of A and B from the same latents: [2, 16, 16, 3]."""
    return pipe([A, B], num_inference_steps=STEPS, guidance_scale=G, latents=np.concatenate([LAT, LAT]))


# ---- the U-Net with and without a controller --------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Recorder(AttentionController):
    seen: list

    def __call__(self, probs, is_cross, place, block, layer, step, state):
        self.seen.append((place, block, layer, is_cross, probs.shape))
        return probs, state + 1


def test_no_controller_same_program_and_identity_bit_exact(pipe):
    unet, params = pipe.unet, pipe.params["unet"]
    x = jnp.asarray(unit_noise(1, (2, 8, 8, 4)))
    t = jnp.asarray([3.0, 700.0])
    ctx = jnp.asarray(unit_noise(2, (2, 77, 32)))
    plain_fn = jax.jit(lambda p, x: unet.apply({"params": p}, x, t, ctx))
    none_fn = jax.jit(lambda p, x: unet.apply({"params": p}, x, t, ctx, attention_control=None))
    assert plain_fn.lower(params, x).as_text() == none_fn.lower(params, x).as_text()
    seen = []                                  # a controller that changes nothing and records the layers
    out, count = jax.jit(lambda p, x: apply_controlled(unet, {"params": p}, x, t, ctx, controller=Recorder(seen),
                                                       state=jnp.zeros((), jnp.int32), step=0))(params, x)
    assert np.array_equal(np.asarray(out), np.asarray(plain_fn(params, x)))   # bit for bit
    # down block 0 (8x8, one attention), mid (4x4), up block 1 (8x8, two attentions): attn1 then attn2 each
    assert [s[:4] for s in seen] == [("down", 0, 0, False), ("down", 0, 0, True), ("mid", 0, 0, False),
                                     ("mid", 0, 0, True), ("up", 1, 0, False), ("up", 1, 0, True),
                                     ("up", 1, 1, False), ("up", 1, 1, True)]
    assert seen[1][4] == (2, 2, 64, 77) and seen[2][4] == (2, 2, 16, 16) and int(count) == 8
    probs, state = IdentityController()(x, True, "mid", 0, 0, 0, {"a": t})
    assert probs is x and state["a"] is t


# ---- the controller on synthetic probabilities --------------------------------------------------------
def _inputs(L, n, cross=None, self_on=None, mapper=None, alphas=None, eq=None):
    return {"mapper": jnp.asarray(np.arange(L)[None] if mapper is None else mapper, jnp.int32),
            "alphas": jnp.ones((1, L)) if alphas is None else jnp.asarray(alphas)[None],
            "equalizer": jnp.ones((1, L)) if eq is None else jnp.asarray(eq)[None],
            "cross": jnp.ones((n, 1, L)) if cross is None else jnp.asarray(cross),
            "self": jnp.ones((n,)) if self_on is None else jnp.asarray(self_on)}


def _probs(rows, q, k, seed=0):
    return jax.nn.softmax(jnp.asarray(unit_noise(seed, (rows, 2, q, k))), axis=-1)


def test_controller_modes():
    L, n = 6, 4
    probs = _probs(4, 16, L)                  # [uncond src, uncond edit, cond src, cond edit]
    state = {"maps": jnp.zeros((2, 16, L)), "count": jnp.zeros(()), "inputs": _inputs(L, n)}
    ctrl = p2p.PromptToPromptController("replace", rows=2, cfg=True, map_queries=16)
    out, st = ctrl(probs, True, "down", 0, 0, jnp.int32(1), state)
    assert np.array_equal(out[3], probs[2]) and np.array_equal(out[:3], probs[:3])
    np.testing.assert_allclose(st["maps"], probs[2:].mean(1), rtol=1e-6)       # pre-edit, conditional rows
    assert float(st["count"]) == 1
    # per-word schedule: token 2 keeps its own map at step 1
    cross = np.ones((n, 1, L), np.float32)
    cross[1, 0, 2] = 0
    out, _ = ctrl(probs, True, "down", 0, 0, jnp.int32(1), dict(state, inputs=_inputs(L, n, cross=cross)))
    assert np.array_equal(out[3, ..., 2], probs[3, ..., 2]) and np.array_equal(out[3, ..., 3], probs[2, ..., 3])
    # self-attention: replaced inside the window at <= self_max_queries positions only
    sp = _probs(4, 16, 16, seed=1)
    on = np.array([1, 0, 0, 0], np.float32)
    st_self = dict(state, inputs=_inputs(L, n, self_on=on))
    assert np.array_equal(ctrl(sp, False, "up", 1, 0, jnp.int32(0), st_self)[0][3], sp[2])
    assert np.array_equal(ctrl(sp, False, "up", 1, 0, jnp.int32(2), st_self)[0][3], sp[3])
    small = dataclasses.replace(ctrl, self_max_queries=8)
    assert np.array_equal(small(sp, False, "up", 1, 0, jnp.int32(0), st_self)[0], sp)
    # refine: "s a b e" -> "s a X b e": X keeps its own map, b takes the source's b
    mapper, alphas = p2p.align_tokens([7, 1, 2, 9], [7, 1, 5, 2, 9], L)
    assert mapper[:5].tolist() == [0, 1, 0, 2, 3] and alphas[:5].tolist() == [1, 1, 0, 1, 1]
    ref = dataclasses.replace(ctrl, mode="refine")
    refined = dict(state, inputs=_inputs(L, n, mapper=mapper[None], alphas=alphas))
    out, _ = ref(probs, True, "mid", 0, 0, jnp.int32(0), refined)
    assert np.array_equal(out[3, ..., 3], probs[2, ..., 2]) and np.array_equal(out[3, ..., 2], probs[3, ..., 2])
    # reweight: the source's maps times the equalizer (negative weights too)
    eq = np.array([1, 1, 3, -1, 1, 1], np.float32)
    rw = dataclasses.replace(ctrl, mode="reweight")
    out, _ = rw(probs, True, "up", 1, 0, jnp.int32(0), dict(state, inputs=_inputs(L, n, eq=eq)))
    np.testing.assert_allclose(out[3], probs[2] * eq, rtol=1e-6)


# ---- the pipeline -------------------------------------------------------------------------------------
def test_injection_windows(pipe, plain):
    src, dst = edit(pipe, A, B, cross_replace_steps=0.0, self_replace_steps=0.0)
    assert src.shape == dst.shape == (1, 16, 16, 3) and src.dtype == np.float32
    np.testing.assert_allclose(src[0], plain[0], rtol=0, atol=1e-5)          # no injection: plain sampling
    np.testing.assert_allclose(dst[0], plain[1], rtol=0, atol=1e-5)
    traces = p2p.trace_counts()["p2p_loop"]
    src2, dst2 = edit(pipe, A, B, cross_replace_steps=1.0, self_replace_steps=1.0)
    assert p2p.trace_counts()["p2p_loop"] == traces                           # fractions are arrays
    assert np.array_equal(src2, src) and np.abs(dst2 - dst).max() > 1e-3
    same = edit(pipe, A, A, cross_replace_steps=1.0, self_replace_steps=1.0)
    assert np.array_equal(same[0], same[1])
    words = edit(pipe, A, B, cross_replace_steps={"default_": 1.0, "blue": 0.0}, self_replace_steps=(0.5, 1.0))
    assert np.abs(words[1] - dst2).max() > 1e-4 and p2p.trace_counts()["p2p_loop"] == traces


def test_refine_reweight_and_blend(pipe):
    src, dst = edit(pipe, "a red circle on the left", A, mode="refine")
    assert dst.shape == (1, 16, 16, 3) and np.isfinite(dst).all() and np.abs(dst - src).max() > 1e-3
    one = edit(pipe, A, A, mode="reweight", equalizer={"red": 1.0}, cross_replace_steps=1.0)
    assert np.array_equal(one[0], one[1])
    up = edit(pipe, A, A, mode="reweight", equalizer={"red": 4.0}, cross_replace_steps=1.0)[1]
    down = edit(pipe, A, A, mode="reweight", equalizer={"red": -2.0}, cross_replace_steps=1.0)[1]
    assert np.abs(up - one[0]).max() > 1e-3 and np.abs(down - up).max() > 1e-3
    free = edit(pipe, A, B, cross_replace_steps=0.5)[1]
    none = edit(pipe, A, B, cross_replace_steps=0.5, local_blend_words=["circle"], local_blend_threshold=1.5)
    assert np.array_equal(none[0], none[1])                                   # empty mask: the source
    full = edit(pipe, A, B, cross_replace_steps=0.5, local_blend_words=(["red"], ["blue"]),
                local_blend_threshold=-1.0, local_blend_start=0.0)
    np.testing.assert_allclose(full[1], free, rtol=0, atol=1e-6)              # full mask: no blending


def test_attention_maps(pipe, plain, folder, tmp_path):
    images, maps, tokens = pipe.attention_maps([A, B], num_inference_steps=STEPS, guidance_scale=G,
                                               latents=np.concatenate([LAT, LAT]))
    np.testing.assert_allclose(images, plain, rtol=0, atol=1e-5)
    assert maps.shape == (2, 8, 8, 77) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)                  # softmax over the 77 tokens
    assert tokens[1] == ["<start>", "a", "large", "blue", "circle", "on", "the", "left", "<end>"]
    assert p2p.cross_attention_sizes(pipe.unet, (8, 8)) == [(8, 8), (4, 4)]      # down 0 / up 1, mid
    assert p2p.map_size(pipe.unet, (8, 8), None) == (8, 8) and p2p.map_size(pipe.unet, (8, 8), 4) == (4, 4)
    with pytest.raises(ValueError, match="heights"):
        pipe.attention_maps(A, num_inference_steps=STEPS, attention_resolution=5)
    src, dst, m = edit(pipe, A, B, return_maps=True)
    assert m["source"].shape == m["edited"].shape == (1, 8, 8, 77) and m["edited_tokens"][0][3] == "blue"
    png = p2p.write_attention_maps(folder, [A, B], str(tmp_path / "maps.png"), num_inference_steps=STEPS)
    assert png[0].dtype == np.uint8 and os.path.getsize(tmp_path / "maps.png") > 1000
    s, d = p2p.write_edit(folder, [A], [B], str(tmp_path / "edit.png"), num_inference_steps=STEPS,
                          guidance_scale=G)
    assert s.shape == d.shape == (1, 16, 16, 3) and os.path.getsize(tmp_path / "edit.png") > 1000


def test_bad_input(pipe):
    with pytest.raises(DataError, match="tokens"):
        edit(pipe, A, "a large blue circle on the left side")
    with pytest.raises(DataError, match="not in the prompt"):
        edit(pipe, A, A, mode="reweight", equalizer={"green": 2.0})
    with pytest.raises(DataError, match="not in the prompt"):
        edit(pipe, A, B, cross_replace_steps={"red": 0.5})                   # words of the edit prompt
    with pytest.raises(DataError, match="neither"):
        edit(pipe, A, B, local_blend_words="green")
    for kw in ({"cross_replace_steps": 1.5}, {"self_replace_steps": -0.1},
               {"cross_replace_steps": {"blue": (0.6, 0.2)}}, {"cross_replace_steps": {"default_": 2}},
               {"local_blend_words": "red", "local_blend_start": 1.2}):
        with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
            edit(pipe, A, B, **kw)
    with pytest.raises(ValueError, match="mode="):
        edit(pipe, A, B, mode="swap")
    with pytest.raises(ValueError, match="equalizer"):
        edit(pipe, A, A, mode="reweight")
    with pytest.raises(DataError, match="edit prompts"):
        edit(pipe, [A, A], [B, B, B])


def test_run_ability():
    from helpers import shared_tiny_ldm

    run = shared_tiny_ldm()
    assert "prompt_to_prompt" in run.abilities
    src, dst = run.prompt_to_prompt([A], [B], seed=0, num_inference_steps=2)
    assert src.shape == dst.shape == (1, 32, 32, 3) and src.dtype == np.uint8
    ref = run.sample(1, seed=0, prompts=[A], num_steps=2)
    assert np.abs(src.astype(int) - ref.astype(int)).max() <= 1              # the source is run.sample's image
