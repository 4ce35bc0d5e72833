"""Original single-file Stable Diffusion checkpoints (CompVis / Stability layout) against diffusers.

Two tiny random diffusers pipelines: SD 1.x-style (CLIP text encoder with quick_gelu under
``cond_stage_model.transformer.``, conv projections, layers_per_block 2, an up block without
attention before one with it) and SD 2.x-style (exact-GELU text encoder in OpenCLIP's layout
under ``cond_stage_model.model.`` with fused in_proj q/k/v, linear projections, per-block heads,
upcast attention, an up block with attention and an upsampler: ``output_blocks.N.2.conv``). Both
share the VAE (its mid-block attention is stored as 1x1 convs).

Each is saved with diffusers' ``save_pretrained``; jaxgen loads that folder, writes the single
file with ``save_single_file``; diffusers reads the file with ``from_single_file(path,
config=<folder of configs only>, local_files_only=True)`` (no hub access) and jaxgen with its own
``from_single_file``. diffusers ships no writer for this layout (the repo's
scripts/convert_diffusers_to_original_stable_diffusion.py is not installed with the package and
hard-codes SD 1.5's 4 x 2 block structure), so the writer is checked against diffusers' reader:
diffusers must rebuild every original tensor exactly from jaxgen's file, consuming all of it.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

import jaxgen  # noqa: E402
from jaxgen.convert import single_file as sf  # noqa: E402
from jaxgen.convert.testing import randomize_torch  # noqa: E402
from jaxgen.errors import ConfigError, WeightError  # noqa: E402
from helpers import check_images, nchw, nhwc, rel_err, tiny_sd_components, unit_noise  # noqa: E402

SIZE, LATENT, STEPS = 16, 8, 3
PROMPTS = ["a large red circle on the left", "a small blue square at the top"]
NEGATIVE = ["a green triangle", ""]
UNETS = {
    "sd1": dict(block_out_channels=(8, 16), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2),
    "sd2": dict(block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, upcast_attention=True),
}


def _configs_only(src: str, dst: str) -> str:
    """A copy of a diffusers pipeline folder without its weights (what config= needs)."""
    for f in glob.glob(os.path.join(src, "**", "*"), recursive=True):
        if os.path.isfile(f) and not f.endswith(".safetensors"):
            out = os.path.join(dst, os.path.relpath(f, src))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copy(f, out)
    return dst


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> dict(torch=original diffusers pipeline, cfg=config folder, path=jaxgen's single
    file, jax=jaxgen pipeline from the diffusers folder, jax_sf / torch_sf: loaded from the file)."""
    root = tmp_path_factory.mktemp("single_file")
    common = tiny_sd_components(root, SIZE)
    tok = common["tokenizer"]
    out = {}
    for name, unet_cfg in UNETS.items():
        parts = dict(common)
        if name == "sd2":         # OpenCLIP-style text tower: exact GELU
            parts["text_encoder"] = randomize_torch(transformers.CLIPTextModel(transformers.CLIPTextConfig(
                vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                hidden_act="gelu", max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)), 7)
        unet = randomize_torch(diffusers.UNet2DConditionModel(
            sample_size=LATENT, in_channels=4, out_channels=4, cross_attention_dim=32, norm_num_groups=4,
            **unet_cfg), 11 if name == "sd1" else 12)
        pt = diffusers.StableDiffusionPipeline(unet=unet, **parts)
        full = str(root / f"{name}_full")
        pt.save_pretrained(full)
        cfg = _configs_only(full, str(root / f"{name}_cfg"))
        pipe = jaxgen.StableDiffusionPipeline.from_pretrained(full)
        path = pipe.save_single_file(str(root / f"{name}.safetensors"))
        torch_sf = diffusers.StableDiffusionPipeline.from_single_file(
            path, config=cfg, local_files_only=True, safety_checker=None, requires_safety_checker=False)
        torch_sf.set_progress_bar_config(disable=True)
        out[name] = dict(torch=pt, cfg=cfg, path=path, jax=pipe, torch_sf=torch_sf,
                         jax_sf=jaxgen.StableDiffusionPipeline.from_single_file(path, cfg),
                         shapes={c: {k: v.shape for k, v in getattr(pipe, c).state_dict_from_params(pipe.params[c]).items()}
                                 for c in ("unet", "vae", "text_encoder")})
    return out


def _same_params(a, b):
    leaves = jax.tree_util.tree_leaves_with_path(jax.tree_util.tree_map(
        lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))
    bad = [jax.tree_util.keystr(p) for p, ok in leaves if not ok]
    assert leaves and not bad, bad[:5]


# ------------------------------------------------------------------------------------------------
# layout agreement
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(UNETS))
def test_diffusers_reads_jaxgen_file_exactly(built, name):
    """diffusers' from_single_file rebuilds every original tensor bit for bit from jaxgen's file,
    and uses all of it (the file holds as many numbers as the three networks)."""
    b = built[name]
    ckpt = load_file(b["path"])
    prefix = sf.CLIP_PREFIX if name == "sd1" else sf.OPEN_CLIP_PREFIX
    assert any(k.startswith(prefix) for k in ckpt)
    attn = ckpt["first_stage_model.decoder.mid.attn_1.q.weight"]
    assert attn.ndim == 4 and attn.shape[2:] == (1, 1)                # the VAE's 1x1-conv attention
    total = 0
    for comp in ("unet", "vae", "text_encoder"):
        ref, got = getattr(b["torch"], comp).state_dict(), getattr(b["torch_sf"], comp).state_dict()
        ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}
        got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
        assert set(ref) == set(got), set(ref) ^ set(got)
        bad = [k for k in ref if not torch.equal(ref[k], got[k])]
        assert not bad, bad[:5]
        total += sum(v.numel() for v in ref.values())
    assert sum(v.size for v in ckpt.values()) == total


@pytest.mark.parametrize("name", list(UNETS))
def test_round_trip_identical(built, name, tmp_path):
    """jaxgen -> single file -> jaxgen gives the same parameters bit for bit, and writing the
    reloaded pipeline again gives the same file contents."""
    b = built[name]
    _same_params(b["jax"].params, b["jax_sf"].params)
    again = load_file(b["jax_sf"].save_single_file(str(tmp_path / "again.safetensors")))
    first = load_file(b["path"])
    assert set(again) == set(first) and all(np.array_equal(again[k], first[k]) for k in first)


def test_config_as_dicts(built):
    """config= as the component config dicts (and tokenizer=) instead of a folder."""
    b = built["sd1"]
    cfg = b["cfg"]
    dicts = {c: json.load(open(os.path.join(cfg, c, "config.json"))) for c in ("unet", "vae", "text_encoder")}
    dicts["scheduler"] = json.load(open(os.path.join(cfg, "scheduler", "scheduler_config.json")))
    from_dicts = jaxgen.StableDiffusionPipeline.from_single_file(b["path"], dicts, tokenizer=os.path.join(cfg, "tokenizer"))
    _same_params(b["jax"].params, from_dicts.params)


# ------------------------------------------------------------------------------------------------
# numerics: networks and pipeline, both loaded from the single file
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(UNETS))
def test_networks_match_diffusers(built, name):
    """Text encoder, U-Net and VAE loaded from the single file by each library: relative error
    <= 1e-5 (float32); for SD 2.x the text encoder (the VAE is shared, the U-Net maps alike)."""
    b = built[name]
    ours, ref = b["jax_sf"], b["torch_sf"]
    p = ours.params
    rng = np.random.default_rng(3)
    errs = {}
    ids = np.asarray(ours.tokenizer.encode(PROMPTS))
    te = jax.jit(lambda q, i: ours.text_encoder.apply({"params": q}, i).last_hidden_state)(p["text_encoder"], ids)
    with torch.no_grad():
        te_ref = ref.text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state
    errs["text_encoder"] = rel_err(te, te_ref)
    if name == "sd2":     # OpenCLIP's layout is SD 2.x's own part; its U-Net maps by the same table
        print(name, errs)  # (bit-exact state dicts above), so the U-Net and VAE run for SD 1.x only
        assert errs["text_encoder"] <= 1e-5, errs
        return
    x = rng.standard_normal((2, LATENT, LATENT, 4)).astype(np.float32)
    t = np.array([7.0, 640.0], np.float32)
    eps = jax.jit(lambda q, *a: ours.unet.apply({"params": q}, *a))(p["unet"], x, t, te)
    with torch.no_grad():
        eps_ref = ref.unet(nchw(x), torch.from_numpy(t), te_ref).sample
    errs["unet"] = rel_err(eps, nhwc(eps_ref))
    img = rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    mean, dec = jax.jit(lambda q, i, z: (ours.vae.apply({"params": q}, i, method="encode").mean,
                                         ours.vae.apply({"params": q}, z, method="decode")))(p["vae"], img, x)
    with torch.no_grad():
        mean_ref = ref.vae.encode(nchw(img)).latent_dist.mean
        dec_ref = ref.vae.decode(nchw(x)).sample
    errs["vae encode"] = rel_err(mean, nhwc(mean_ref))
    errs["vae decode"] = rel_err(dec, nhwc(dec_ref))
    print(name, {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= 1e-5, errs


def test_pipeline_images_match_diffusers(built):
    b = built["sd1"]
    latents = unit_noise(5, (len(PROMPTS), LATENT, LATENT, 4))
    ours = b["jax_sf"](PROMPTS, NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents)
    ref = b["torch_sf"](PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                        latents=nchw(latents), output_type="np").images
    check_images(ours, ref, "single-file SD 1.x pipeline")


# ------------------------------------------------------------------------------------------------
# what real checkpoints carry besides the networks
# ------------------------------------------------------------------------------------------------
def test_real_checkpoint_extras_and_ema(built, tmp_path):
    """An SD 2.x file as Stability ships it: OpenCLIP's unused last block, text_projection and
    logit_scale, the DDPM schedule buffers, an EMA copy of the U-Net. The extras are skipped (the
    same weights load); extract_ema=True takes the U-Net from the EMA copy."""
    b = built["sd2"]
    ckpt = load_file(b["path"])
    rng = np.random.default_rng(9)
    extra = dict(ckpt)
    for k in [k for k in ckpt if ".resblocks.1." in k]:      # the 2-layer encoder's unused 3rd block
        extra[k.replace(".resblocks.1.", ".resblocks.2.")] = rng.standard_normal(ckpt[k].shape).astype(np.float32)
    extra[sf.OPEN_CLIP_PREFIX + "text_projection"] = rng.standard_normal((32, 16)).astype(np.float32)
    extra[sf.OPEN_CLIP_PREFIX + "logit_scale"] = np.array(4.6, np.float32)
    extra["alphas_cumprod"] = np.linspace(0.999, 0.01, 1000).astype(np.float32)
    extra["model_ema.decay"] = np.array(0.9999, np.float32)
    ema = {sf.ema_key(k): (v + 0.01).astype(np.float32) for k, v in ckpt.items() if k.startswith(sf.UNET_PREFIX)}
    full = {**extra, **ema}
    p = b["jax"]
    states = {c: getattr(p, c).state_dict_from_params(p.params[c]) for c in ("unet", "vae", "text_encoder")}

    def same(got, want):
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)

    plain = _split(b, full)
    for comp in states:
        same(plain[comp], states[comp])
    with_ema = sf.split_checkpoint(full, b["shapes"], p.unet, p.vae, p.text_encoder, extract_ema=True)
    same(with_ema["text_encoder"], states["text_encoder"])
    same(with_ema["unet"], {k: v + np.float32(0.01) for k, v in states["unet"].items()})
    # end to end through the pipeline
    path = str(tmp_path / "sd2_full.safetensors")
    save_file(full, path)
    loaded = jaxgen.StableDiffusionPipeline.from_single_file(path, b["cfg"], extract_ema=True)
    _same_params(p.params["text_encoder"], loaded.params["text_encoder"])
    with pytest.raises(WeightError, match="no EMA weights"):
        jaxgen.StableDiffusionPipeline.from_single_file(b["path"], b["cfg"], extract_ema=True)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def _split(b, ckpt):
    p = b["jax"]
    return sf.split_checkpoint(ckpt, b["shapes"], p.unet, p.vae, p.text_encoder, where="f.safetensors")


def test_half_precision_file(built):
    """dtype=np.float16 writes half tensors; reading them back gives the half-rounded weights."""
    b = built["sd2"]
    p = b["jax"]
    half = sf.ldm_state_dict(p.unet, p.vae, p.text_encoder, p.params, dtype=np.float16)
    assert {v.dtype for v in half.values()} == {np.dtype(np.float16)}
    back = _split(b, half)
    for comp in ("unet", "text_encoder"):
        state = getattr(p, comp).state_dict_from_params(p.params[comp])
        assert set(back[comp]) == set(state)
        assert all(np.array_equal(back[comp][k], state[k].astype(np.float16)) for k in state)


def test_key_and_shape_errors(built):
    b = built["sd1"]
    ckpt = load_file(b["path"])
    assert sf.diffusers_shapes(b["jax"].vae) == b["shapes"]["vae"]          # the shapes read_single_file uses
    assert set(_split(b, ckpt)["vae"]) == set(b["torch"].vae.state_dict())
    with pytest.raises(WeightError, match=r"unmapped keys \(1\): model\.diffusion_model\.input_blocks\.9\.0\.op\.weight"):
        _split(b, {**ckpt, "model.diffusion_model.input_blocks.9.0.op.weight": np.zeros((3,), np.float32)})
    gone = "first_stage_model.encoder.mid.attn_1.k.weight"
    with pytest.raises(WeightError, match=r"missing keys \(1\): " + gone.replace(".", r"\.")):
        _split(b, {k: v for k, v in ckpt.items() if k != gone})
    bad = dict(ckpt)
    bad[gone] = ckpt[gone][:, :, 0, 0]                          # a Linear [C, C] where a 1x1 conv belongs
    with pytest.raises(WeightError, match=r"attn_1\.k\.weight: file has \(16, 16\), expected \(16, 16, 1, 1\)"):
        _split(b, bad)
    qkv = sf.OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"
    sd2 = load_file(built["sd2"]["path"])
    sd2[qkv] = sd2[qkv][:64]
    with pytest.raises(WeightError, match=r"in_proj_weight: file has \(64, 32\), expected \(96, 32\)"):
        _split(built["sd2"], sd2)
    # an SD 1.x file read with the SD 2.x configs: the U-Net's and text encoder's keys disagree
    with pytest.raises(WeightError, match="open_clip|missing keys"):
        _split(built["sd2"], ckpt)


def test_file_errors(built, tmp_path):
    b = built["sd1"]
    raw = open(b["path"], "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightError, match="truncated or corrupt"):
        jaxgen.StableDiffusionPipeline.from_single_file(str(cut), b["cfg"])
    with pytest.raises(WeightError, match="no such file"):
        jaxgen.StableDiffusionPipeline.from_single_file(str(tmp_path / "none.safetensors"), b["cfg"])
    ckpt_path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in load_file(b["path"]).items()}}, ckpt_path)
    with pytest.raises(WeightError, match="allow_pickle=True"):
        jaxgen.StableDiffusionPipeline.from_single_file(str(ckpt_path), b["cfg"])
    pickled, stored = sf.read_checkpoint(ckpt_path, allow_pickle=True), load_file(b["path"])
    assert set(pickled) == set(stored) and all(np.array_equal(pickled[k], stored[k]) for k in stored)
    # a diffusers-layout weight file is not a single file; a missing network is named by prefix
    unet_file = os.path.join(os.path.dirname(b["cfg"]), "sd1_full", "unet", "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightError, match="not an original-layout"):
        jaxgen.StableDiffusionPipeline.from_single_file(unet_file, b["cfg"])
    no_text = tmp_path / "no_text.safetensors"
    save_file({k: v for k, v in load_file(b["path"]).items() if not k.startswith("cond_stage_model.")}, str(no_text))
    with pytest.raises(WeightError, match="no text encoder"):
        jaxgen.StableDiffusionPipeline.from_single_file(str(no_text), b["cfg"])
    with pytest.raises(ConfigError, match="tokenizer="):
        jaxgen.StableDiffusionPipeline.from_single_file(b["path"], {"unet": {}, "vae": {}, "text_encoder": {},
                                                                    "scheduler": {}})
    with pytest.raises(ValueError, match=r"\*\.safetensors"):
        b["jax"].save_single_file(str(tmp_path / "out.ckpt"))
