"""LoRA (jaxgen/lora.py and the Stable Diffusion pipeline's LoRA methods) against diffusers + peft.

A tiny random diffusers Stable Diffusion pipeline (tiny_sd_components; a U-Net with attention,
1x1 and 3x3 convolutions) is saved by diffusers. LoRAs are made with peft on the torch modules
(every lora_A / lora_B randomised, so no factor is zero) and written by diffusers'
``save_lora_weights``:

* "a": peft layout with diffusers' metadata header: U-Net r=4, alpha 8, rank_pattern conv1 -> 2,
  alpha_pattern to_k -> 3, Dense and 1x1 / 3x3 conv targets; text encoder r=2, alpha 6, rsLoRA.
* "b": diffusers' own key spelling (convert_state_dict_to_diffusers: ``.lora.down.weight``,
  ``.lora_linear_layer.down.weight``), attention projections only, no metadata (alpha = rank).
* "kohya": the weights of "a" under kohya names (lora_unet_... / lora_te_..., .alpha scalars).

diffusers' ``load_lora_weights`` (peft layers, unfused) and jaxgen must give the same U-Net and
text-encoder outputs (relative error <= 1e-5) and the same pipeline images (max abs <= 1e-3) for
unfused adapters with weights, two adapters (set_adapters) and fuse_lora with a scale. jaxgen's
``save_lora`` output must load in diffusers and reproduce jaxgen's outputs.

transformers 5.25 refuses peft < 0.22 in its adapter integration (``check_peft_version``), and
0.21.2 is the newest peft on PyPI here: the module fixture lifts that version gate for this file
(only when the installed peft is older), so diffusers' own text-encoder loading path runs
unchanged; the text-encoder parity below shows the adapter really is applied there.
"""
from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jaxgen  # noqa: E402
from jaxgen.convert.testing import randomize_torch  # noqa: E402
from jaxgen.errors import ConfigError, WeightError  # noqa: E402
from jaxgen.lora import LoraWeights, init_lora, load_lora, lora_nbytes, merge, parse_lora, save_lora  # noqa: E402
from helpers import check_images, max_err, nchw, nhwc, rel_err, tiny_sd_components, unit_noise  # noqa: E402

TOL = 1e-5
STEPS, SIZE, LATENT = 3, 16, 8
PROMPTS = ["a large red circle on the left", "a small blue square at the top"]
# one level, no mid block (compiles fast); it still has every kind of LoRA target: Linear
# attention / feed-forward / time projections, 1x1 convs (proj_in/out, conv_shortcut), 3x3 convs
UNET = dict(sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(8,), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4, mid_block_type=None)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2",
                "time_emb_proj", "conv_shortcut"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# ---- making LoRA files with peft and diffusers ---------------------------------------------------
def _randomize_lora(model, seed: int) -> None:
    """Every lora_A / lora_B ~ N(0, 1 / fan_in) (peft zero-initialises lora_B)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) / int(np.prod(p.shape[1:])) ** 0.5)


def peft_lora(pt_pipe, unet_cfg, te_cfg, seed: int):
    """(U-Net state dict, text-encoder state dict, their LoraConfig dicts) of random peft LoRAs on
    copies of the pipeline's torch modules (peft's own key names, adapter name removed)."""
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pt_pipe.unet)
    unet.add_adapter(peft.LoraConfig(**unet_cfg))
    te = inject_adapter_in_model(peft.LoraConfig(**te_cfg), copy.deepcopy(pt_pipe.text_encoder))
    _randomize_lora(unet, seed)
    _randomize_lora(te, seed + 1)
    return (get_peft_model_state_dict(unet), get_peft_model_state_dict(te),
            unet.peft_config["default"].to_dict(), te.peft_config["default"].to_dict())


def to_kohya(unet_sd, te_sd, unet_alpha: float, te_alpha: float) -> dict:
    """kohya names of peft state dicts: lora_unet_<module, _ for .>.lora_down.weight etc. (the text
    encoder's modules with transformers 4's text_model. prefix, as kohya files have them)."""
    out = {}
    for prefix, sd, alpha, extra in (("lora_unet_", unet_sd, unet_alpha, ""),
                                     ("lora_te_", te_sd, te_alpha, "text_model.")):
        for key, value in sd.items():
            module, _, factor = key.rpartition(".lora_")
            name = prefix + (extra + module).replace(".", "_")
            out[f"{name}.{'lora_down' if factor.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


@pytest.fixture(scope="module", autouse=True)
def transformers_accepts_installed_peft():
    """Lift transformers' peft>=0.22 gate (see the module docstring) while this file runs."""
    import transformers.integrations.peft as tp
    from packaging.version import Version

    if Version(peft.__version__) >= Version(tp.MIN_PEFT_VERSION):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tp, "check_peft_version", lambda min_version: None)
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """{"folder": the SD folder, "pt": a diffusers pipeline, "files": {name: LoRA file}, "a_sd": ...}."""
    from diffusers.utils import convert_state_dict_to_diffusers

    root = tmp_path_factory.mktemp("lora")
    unet = randomize_torch(diffusers.UNet2DConditionModel(**UNET), 1)
    pt = diffusers.StableDiffusionPipeline(unet=unet, **tiny_sd_components(root, SIZE))
    pt.save_pretrained(root / "sd")
    save = diffusers.StableDiffusionPipeline.save_lora_weights
    files = {}
    ua, ta, ucfg, tcfg = peft_lora(pt, dict(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"conv1": 2},
                                            alpha_pattern={"to_k": 3}),
                                   dict(r=2, lora_alpha=6, target_modules=TE_TARGETS, use_rslora=True), 10)
    save(root / "a", unet_lora_layers=ua, text_encoder_lora_layers=ta, unet_lora_adapter_metadata=ucfg,
         text_encoder_lora_adapter_metadata=tcfg)
    files["a"] = str(root / "a" / "pytorch_lora_weights.safetensors")
    ub, tb, _, _ = peft_lora(pt, dict(r=2, lora_alpha=5, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                             dict(r=3, lora_alpha=1, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), 20)
    save(root / "b", unet_lora_layers=convert_state_dict_to_diffusers(ub),
         text_encoder_lora_layers=convert_state_dict_to_diffusers(tb), weight_name="b.safetensors")
    files["b"] = str(root / "b" / "b.safetensors")
    from safetensors.torch import save_file

    files["kohya"] = str(root / "kohya.safetensors")
    save_file(to_kohya(ua, ta, 8.0, 1.5), files["kohya"])
    return {"root": root, "folder": str(root / "sd"), "files": files, "a_sd": (ua, ta)}


def diffusers_pipe(setup, adapters):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(setup["folder"], safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for name in adapters:
        pipe.load_lora_weights(setup["files"][name], adapter_name=name)
    return pipe


@pytest.fixture(scope="module")
def jpipe(setup):
    return jaxgen.StableDiffusionPipeline.from_pretrained(setup["folder"])


# ---- model-level parity ------------------------------------------------------------------------
RNG = np.random.default_rng(3)
X = RNG.standard_normal((2, LATENT, LATENT, 4)).astype(np.float32)
T = np.array([3.0, 700.0], np.float32)
CTX = RNG.standard_normal((2, 7, 32)).astype(np.float32)


def torch_outputs(pipe, ids):
    with torch.no_grad():
        u = nhwc(pipe.unet(nchw(X), torch.from_numpy(T), torch.from_numpy(CTX)).sample)
        t = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    return u, t


@pytest.fixture(scope="module")
def forwards(jpipe):
    unet = jax.jit(lambda p: jpipe.unet.apply({"params": p}, X, T, CTX))
    text = jax.jit(lambda p, ids: jpipe.text_encoder.apply({"params": p}, ids).last_hidden_state)
    ids = np.asarray(jpipe.tokenizer.encode(PROMPTS))
    return unet, text, ids


def test_loaded_lora_matches_diffusers(setup, jpipe, forwards):
    """U-Net and text encoder with each file's adapter: diffusers (peft layers) vs jaxgen (merged)."""
    unet_fwd, text_fwd, ids = forwards
    pt = diffusers_pipe(setup, ["a", "b", "kohya"])
    pt.disable_lora()
    base_u, base_t = torch_outputs(pt, ids)
    pt.enable_lora()
    targets = {c: jpipe.params[c] for c in ("unet", "text_encoder")}
    np.testing.assert_allclose(np.asarray(unet_fwd(jpipe.params["unet"])), base_u, rtol=1e-4, atol=1e-5)
    for name, scale in (("a", 1.0), ("b", 1.0), ("kohya", 0.6)):
        pt.set_adapters([name], [scale])
        ref_u, ref_t = torch_outputs(pt, ids)
        adapter = load_lora(setup["files"][name], targets)
        assert set(adapter) == {"unet", "text_encoder"}
        u = unet_fwd(merge(jpipe.params["unet"], adapter["unet"], scale))
        t = text_fwd(merge(jpipe.params["text_encoder"], adapter["text_encoder"], scale), ids)
        eu, et = rel_err(u, ref_u), rel_err(t, ref_t)
        print(f"LoRA {name!r} (weight {scale}): U-Net rel. error {eu:.2e}, text encoder {et:.2e}; "
              f"LoRA changes them by {rel_err(ref_u, base_u):.2f} / {rel_err(ref_t, base_t):.2f}")
        assert eu <= TOL and et <= TOL, (name, eu, et)
        assert rel_err(ref_u, base_u) > 1e-2 and rel_err(ref_t, base_t) > 1e-2     # the LoRA matters
    # kohya names map to the same kernels as the diffusers names of the same weights
    a, k = load_lora(setup["files"]["a"], targets), load_lora(setup["files"]["kohya"], targets)
    for c in a:
        assert set(a[c]) == set(k[c])
        for path in a[c]:
            np.testing.assert_array_equal(np.asarray(a[c][path].down), np.asarray(k[c][path].down))
            np.testing.assert_array_equal(np.asarray(a[c][path].up), np.asarray(k[c][path].up))
            assert k[c][path].alpha == (8.0 if c == "unet" else 1.5)
    # the metadata's patterns and rsLoRA: to_k alpha 3, conv1 rank 2, text encoder alpha 6 sqrt(2)
    conv1 = [w for p, w in a["unet"].items() if p.endswith("conv1/kernel")]
    to_k = [w for p, w in a["unet"].items() if p.endswith("to_k/kernel")]
    assert conv1 and all(w.rank == 2 and w.alpha == 8 and w.down.ndim == 4 for w in conv1)
    assert to_k and all(w.rank == 4 and w.alpha == 3 for w in to_k)
    assert all(np.isclose(w.alpha, 6 * 2 ** 0.5) for w in a["text_encoder"].values())
    assert lora_nbytes(a) == 4 * sum(v.numel() for sd in setup["a_sd"] for v in sd.values())


# ---- pipeline parity -----------------------------------------------------------------------------
def test_pipeline_unfused_two_adapters_and_fused(setup, jpipe, forwards):
    latents = unit_noise(5, (len(PROMPTS), LATENT, LATENT, 4))
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5)
    pt = diffusers_pipe(setup, ["a", "b"])
    plain = jpipe(PROMPTS, latents=latents, **kwargs)                       # no LoRA yet
    jpipe.load_lora_weights(setup["files"]["a"], adapter_name="a")
    jpipe.load_lora_weights(os.path.dirname(setup["files"]["b"]), adapter_name="b", weight_name="b.safetensors")
    assert jpipe.get_active_adapters() == ["b"] == pt.get_active_adapters()     # the last one loaded
    assert jpipe.get_list_adapters() == {"unet": ["a", "b"], "text_encoder": ["a", "b"]}

    def both(what):
        ours = jpipe(PROMPTS, latents=latents, **kwargs)
        ref = pt(PROMPTS, latents=nchw(latents), output_type="np", **kwargs).images
        return check_images(ours, ref, what)

    pt.set_adapters(["a"], [0.6])
    jpipe.set_adapters(["a"], [0.6])
    both("LoRA a, weight 0.6 (unfused)")
    before = jpipe.trace_counts()
    weights = [0.5, {"unet": 1.2, "text_encoder": 0.8}]
    pt.set_adapters(["a", "b"], weights)
    jpipe.set_adapters(["a", "b"], weights)
    ours = jpipe(PROMPTS, latents=latents, **kwargs)
    assert jpipe.trace_counts() == before, "changing adapters and weights recompiled"
    check_images(ours, pt(PROMPTS, latents=nchw(latents), output_type="np", **kwargs).images,
                 "LoRAs a 0.5 + b (U-Net 1.2, text 0.8) (unfused)")
    assert max_err(ours, plain) > 1e-2                                        # the adapters matter
    # encode_prompt runs the same unfused text-encoder LoRA (in its own compiled stage)
    te = jpipe.params["text_encoder"]
    targets = {c: jpipe.params[c] for c in ("unet", "text_encoder")}
    both_te = [load_lora(setup["files"][n], targets)["text_encoder"] for n in ("a", "b")]
    want = forwards[1](merge(te, both_te, [0.5, 0.8]), forwards[2])
    assert rel_err(jpipe.encode_prompt(PROMPTS), want) <= 1e-6
    originals = jax.tree_util.tree_map(np.asarray, {c: jpipe.params[c] for c in ("unet", "text_encoder")})
    pt.set_adapters(["a"], [0.9])
    jpipe.set_adapters(["a"], [0.9])
    pt.fuse_lora(lora_scale=0.7)
    jpipe.fuse_lora(lora_scale=0.7)
    both("LoRA a, weight 0.9, fused with lora_scale 0.7")
    with pytest.raises(ConfigError, match="unfuse_lora"):
        jpipe.set_adapters(["b"])
    jpipe.unfuse_lora()
    for c, tree in originals.items():                                        # restored bit for bit
        jax.tree_util.tree_map(np.testing.assert_array_equal, tree, jax.tree_util.tree_map(np.asarray, jpipe.params[c]))
    with pytest.raises(ConfigError, match="'nope'"):
        jpipe.set_adapters(["a", "nope"])
    with pytest.raises(ConfigError, match="already in use"):
        jpipe.load_lora_weights(setup["files"]["a"], adapter_name="a")
    jpipe.unload_lora_weights()
    assert jpipe.get_list_adapters() == {} and jpipe.lora_call_params() is jpipe.params
    np.testing.assert_array_equal(jpipe(PROMPTS, latents=latents, **kwargs), plain)


# ---- saving ------------------------------------------------------------------------------------
def test_save_lora_loads_in_diffusers(setup, jpipe, forwards, tmp_path):
    """init_lora (mixed ranks and alphas) with random up factors -> save_lora -> diffusers'
    load_lora_weights reproduces jaxgen's outputs; jaxgen reads its own file back exactly."""
    unet_fwd, text_fwd, ids = forwards
    key = jax.random.key(0)
    unet = {**init_lora(jpipe.params["unet"], ["to_q", "to_v", "proj_in", "conv2"], 3, key, alpha=6.0),
            **init_lora(jpipe.params["unet"], ["conv_shortcut", "time_emb_proj"], 2, jax.random.fold_in(key, 1))}
    te = init_lora(jpipe.params["text_encoder"], ["q_proj", "fc2"], 2, jax.random.fold_in(key, 2), alpha=4.0)
    for x, y in zip(jax.tree_util.tree_leaves(merge(jpipe.params["unet"], unet)),
                    jax.tree_util.tree_leaves(jpipe.params["unet"])):
        np.testing.assert_array_equal(x, y)                                 # up = 0: merging changes nothing
    rng = np.random.default_rng(4)
    bump = lambda tree: {p: w.replace(up=jnp.asarray(rng.standard_normal(w.up.shape).astype(np.float32)
                                                     / w.up.shape[0] ** 0.5)) for p, w in tree.items()}
    adapter = {"unet": bump(unet), "text_encoder": bump(te)}
    path = save_lora(tmp_path / "mine", adapter)
    meta = json.loads(__import__("safetensors").safe_open(path, "numpy").metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 3 and meta["unet.rank_pattern"] and meta["unet.alpha_pattern"]
    back = load_lora(path, {c: jpipe.params[c] for c in adapter})
    for c in adapter:
        assert set(back[c]) == set(adapter[c])
        for p, w in adapter[c].items():
            assert back[c][p].alpha == w.alpha
            np.testing.assert_array_equal(np.asarray(back[c][p].down), np.asarray(w.down))
            np.testing.assert_array_equal(np.asarray(back[c][p].up), np.asarray(w.up))
    pt = diffusers.StableDiffusionPipeline.from_pretrained(setup["folder"], safety_checker=None,
                                                           requires_safety_checker=False)
    pt.load_lora_weights(str(tmp_path / "mine"), adapter_name="mine")
    ref_u, ref_t = torch_outputs(pt, ids)
    eu = rel_err(unet_fwd(merge(jpipe.params["unet"], adapter["unet"])), ref_u)
    et = rel_err(text_fwd(merge(jpipe.params["text_encoder"], adapter["text_encoder"]), ids), ref_t)
    print(f"save_lora -> diffusers: U-Net rel. error {eu:.2e}, text encoder {et:.2e}")
    assert eu <= TOL and et <= TOL
    assert rel_err(unet_fwd(jpipe.params["unet"]), ref_u) > 1e-2


def test_init_lora_and_merge_are_pure_and_differentiable(jpipe):
    params = jpipe.params["unet"]
    lora = init_lora(params, "down_blocks\\.0\\..*to_(q|v)", 4, jax.random.key(1))
    assert sorted(lora) == sorted(p for p in lora if "down_blocks_0" in p) and len(lora) == 4   # attn1/2 x q/v
    for w in lora.values():
        bound = 1 / np.sqrt(w.down.shape[0])
        assert w.down.shape[-1] == 4 and np.abs(np.asarray(w.down)).max() <= bound and not np.any(np.asarray(w.up))
    probe = {p: jnp.asarray(np.random.default_rng(0).standard_normal(np.shape(w.down)[:-1] + np.shape(w.up)[1:]),
                            jnp.float32) for p, w in lora.items()}

    def loss(l, s):
        merged = merge(params, l, s)
        return sum(jnp.sum(probe[p] * _leaf(merged, p)) for p in lora)

    g = jax.jit(jax.grad(loss))(lora, jnp.float32(0.5))
    for p in lora:                  # d/d up = s alpha/r down^T probe; d/d down = 0 while up = 0
        assert isinstance(g[p], LoraWeights) and np.abs(np.asarray(g[p].up)).max() > 0
        assert not np.any(np.asarray(g[p].down))
    with pytest.raises(ConfigError, match="matches no Dense or Conv"):
        init_lora(params, ["norm1"], 4, jax.random.key(0))


def _leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


# ---- errors --------------------------------------------------------------------------------------
def test_errors_name_the_problem(setup, jpipe, tmp_path):
    targets = {c: jpipe.params[c] for c in ("unet", "text_encoder")}
    mod = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"        # Linear 8 -> 8
    a, b = np.zeros((4, 8), np.float32), np.zeros((8, 4), np.float32)
    with pytest.raises(WeightError, match="no_such_layer"):
        parse_lora({"unet.down_blocks.0.no_such_layer.lora_A.weight": a,
                    "unet.down_blocks.0.no_such_layer.lora_B.weight": b}, targets)
    with pytest.raises(WeightError, match=r"input_blocks.*sgm"):
        parse_lora({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": a}, targets)
    with pytest.raises(WeightError, match=r"rank mismatch.*\(4, 8\).*\(8, 3\)"):
        parse_lora({f"{mod}.lora_A.weight": a, f"{mod}.lora_B.weight": np.zeros((8, 3), np.float32)}, targets)
    with pytest.raises(WeightError, match=r"\(4, 9\).*do not fit"):
        parse_lora({f"{mod}.lora_A.weight": np.zeros((4, 9), np.float32), f"{mod}.lora_B.weight": b}, targets)
    with pytest.raises(WeightError, match="no matching lora_B"):
        parse_lora({f"{mod}.lora_A.weight": a}, targets)
    with pytest.raises(WeightError, match="DoRA"):
        parse_lora({f"{mod}.lora_magnitude_vector.weight": np.zeros(8, np.float32)}, targets)
    with pytest.raises(WeightError, match="metadata says rank 2"):
        parse_lora({f"{mod}.lora_A.weight": a, f"{mod}.lora_B.weight": b}, targets,
                   metadata={"unet.r": 2, "unet.lora_alpha": 2})
    with pytest.raises(WeightError, match="norm1"):                # a LayerNorm is not a LoRA target
        parse_lora({"unet.down_blocks.0.attentions.0.transformer_blocks.0.norm1.lora_A.weight": a,
                    "unet.down_blocks.0.attentions.0.transformer_blocks.0.norm1.lora_B.weight": b}, targets)
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(open(setup["files"]["a"], "rb").read()[:1000])
    with pytest.raises(WeightError, match="corrupt"):
        load_lora(bad, targets)
    for name in ("x.safetensors", "y.safetensors"):
        (tmp_path / "two" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "two" / name).write_bytes(open(setup["files"]["kohya"], "rb").read())
    with pytest.raises(ConfigError, match="weight_name"):
        jpipe.load_lora_weights(tmp_path / "two")                  # which of the two files?
    with pytest.raises(ConfigError, match=r"\['ghost'\] are not loaded"):
        jpipe.set_adapters("ghost")
    # diffusers' old attention-processor names (to_out_lora -> to_out.0 / out_proj)
    old = parse_lora({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": a,
                      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": b,
                      "text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora.down.weight": np.zeros((2, 32)),
                      "text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora.up.weight": np.zeros((32, 2))},
                     targets)
    assert list(old["unet"]) == ["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel"]
    assert list(old["text_encoder"]) == ["text_model/encoder/layers_1/self_attn/out_proj/kernel"]
    # a kohya alpha per module is that module's alpha
    k = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": a,
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": b,
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": np.float32(2.0)}
    (w,) = parse_lora(k, targets)["unet"].values()
    assert w.alpha == 2.0 and w.rank == 4
