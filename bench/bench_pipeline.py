"""Stable Diffusion text-to-image: jaxgen vs diffusers, a whole pipeline call on the same weights.

    JAX_PLATFORMS=cpu python bench/bench_pipeline.py [--size 64] [--batch 1] [--steps 8,50]
                                                     [--iters 3] [--shape tiny|small|sd15]
                                                     [--dtype float32|bfloat16] [--threads 1]

A small random Stable Diffusion pipeline (every weight randomised) is built with diffusers and
saved; jaxgen loads the folder. Both run the full call (tokenise, text encoder, classifier-free
guidance at 7.5 with a negative prompt, DDIM over the given steps, VAE decode, [0, 1] images)
from the same latents. Reported per step count, after a warm-up call, medians over --iters:
  jaxgen compile: first call minus a steady call (the denoising loop compiles per step count;
                  text encoder and VAE decoder compile once);
  per image:      steady wall time of one call / batch;
and the images' max abs difference. The ratio ours / peer (time per image) is printed last.

On CPU, XLA's convolutions are ~2.5x slower than torch's oneDNN kernels, which dominates these
convolutional models; jaxgen's loop has no Python per step. --threads 1 (default) also turns off
XLA's multi-threaded Eigen; use it on a shared machine (see bench/common.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time, setup_threads  # noqa: E402

from jaxgen.convert.testing import randomize_torch as randomize  # noqa: E402

CAPTIONS = [f"a {s} {c} {k} {p}" for s in ("small", "large") for c in ("red", "green", "blue", "yellow")
            for k in ("circle", "square", "triangle") for p in ("on the left", "at the top", "in the center")]


SHAPES = ("tiny", "small", "sd15")


def build(folder: str, size: int, shape: str = "small") -> None:
    """A random Stable Diffusion pipeline saved by diffusers at ``folder``/sd for ``size`` pixels.
    shape "small": SD-1.x-shaped, VAE factor 4, a 2-level U-Net with cross-attention, a 2-layer
    CLIP text encoder of width 64; "tiny": one U-Net level, VAE factor 2 (bench/run_all.py's test);
    "sd15": Stable Diffusion 1.5's shapes (VAE factor 8, the 860 M U-Net, CLIP ViT-L/14's 12-layer
    text encoder; for a GPU)."""
    import diffusers
    import transformers

    from jaxgen.tokenizer import train_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: one of {SHAPES}")
    tok = train_tokenizer(CAPTIONS * 2, 700, os.path.join(folder, "_tok"))
    pt_tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"))
    width, layers, heads = {"tiny": (32, 1, 2), "small": (64, 2, 4), "sd15": (768, 12, 12)}[shape]
    text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)), 3)
    vae_blocks, groups = {"tiny": ((8, 8), 4), "small": ((16, 32, 32), 8), "sd15": ((128, 256, 512, 512), 32)}[shape]
    vae = randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_blocks,
        down_block_types=("DownEncoderBlock2D",) * len(vae_blocks), up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
        layers_per_block=2 if shape == "sd15" else 1, norm_num_groups=groups, sample_size=size), 2)
    factor = 2 ** (len(vae_blocks) - 1)
    if shape == "sd15":
        from bench_unet_cond import PRESETS

        unet_cfg = {**PRESETS["sd15"], "sample_size": size // factor}
    elif shape == "tiny":
        unet_cfg = dict(sample_size=size // factor, in_channels=4, out_channels=4, block_out_channels=(8,),
                        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                        up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=width, attention_head_dim=2,
                        norm_num_groups=4)
    else:
        unet_cfg = dict(sample_size=size // factor, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
                        attention_head_dim=4, norm_num_groups=8)
    unet = randomize(diffusers.UNet2DConditionModel(**unet_cfg), 1)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=pt_tok,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(folder, "sd"))


def measure(size: int = 64, batch: int = 1, steps_list=(8, 50), iters: int = 3, shape: str = "small",
            dtype: str = "float32", threads: int = 1, log=print) -> dict:
    """A whole text-to-image call, jaxgen against diffusers, on the random pipeline ``build``
    makes. Returns {"load_s", "unet_params", "steps": {N: {"jaxgen_compile_s", "jaxgen_per_image_s",
    "diffusers_per_image_s", "ours_over_peer", "max_abs_diff"}}}. On a GPU both run in ``dtype``."""
    import jax
    import torch

    precision = jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
    torch.set_num_threads(threads)
    with precision:
        return _measure(size, batch, steps_list, iters, shape, dtype, log)


def _measure(size, batch, steps_list, iters, shape, dtype, log) -> dict:
    import diffusers
    import jax
    import jax.numpy as jnp
    import torch

    import jaxgen

    threads = torch.get_num_threads()
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, size, shape)
        folder = os.path.join(tmp, "sd")
        t0 = time.perf_counter()
        ours = jaxgen.StableDiffusionPipeline.from_pretrained(folder, dtype=None if dtype == "float32" else jnp.bfloat16)
        load_s = time.perf_counter() - t0
        peer = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, dtype=tdtype,
                                                                 requires_safety_checker=False).to(device)
        peer.set_progress_bar_config(disable=True)
    prompts = (CAPTIONS * batch)[:batch]
    negative = ["a green triangle"] * batch
    h = size // ours.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((batch, h, h, 4)).astype(np.float32)
    latents_pt = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(device, tdtype)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    n_unet = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(ours.params["unet"]))
    log(f"SD pipeline ({shape}), {size}x{size} images, latents {h}x{h}x4, batch {batch}, {dtype}, "
        f"U-Net {n_unet / 1e6:.2f} M params; threads {threads}; jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} ({device}); jaxgen load {load_s:.2f}s; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    out = {"size": size, "batch": batch, "shape": shape, "dtype": dtype, "load_s": load_s, "unet_params": n_unet,
           "steps": {}}
    for steps in steps_list:
        def run_ours():
            return ours(prompts, negative, num_inference_steps=steps, guidance_scale=7.5, latents=latents)

        def run_peer():
            with torch.no_grad():
                images = peer(prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
                              height=size, width=size, latents=latents_pt, output_type="np").images
            sync()
            return images

        t0 = time.perf_counter()
        first = run_ours()
        first_s = time.perf_counter() - t0
        ours_t = median_time(run_ours, iters)
        ref = run_peer()                                          # warm-up
        peer_t = median_time(run_peer, iters)
        err = float(np.max(np.abs(first.astype(np.float64) - np.asarray(ref, np.float64))))
        out["steps"][int(steps)] = {"jaxgen_compile_s": max(first_s - ours_t, 0.0),
                                    "jaxgen_per_image_s": ours_t / batch, "diffusers_per_image_s": peer_t / batch,
                                    "ours_over_peer": ours_t / peer_t, "max_abs_diff": err}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of the VAE factor)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per call")
    ap.add_argument("--steps", type=str, default="8,50")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    setup_threads(args.threads)          # before jax starts: XLA reads its flags once
    r = measure(args.size, args.batch, [int(s) for s in args.steps.split(",")], args.iters, args.shape,
                args.dtype, args.threads)
    print(f"{'steps':>5s} {'jaxgen compile':>15s} {'jaxgen/image':>13s} {'diffusers/image':>16s} "
          f"{'max |diff|':>11s} {'ours/peer':>10s}")
    for steps, row in r["steps"].items():
        print(f"{steps:5d} {row['jaxgen_compile_s']:14.2f}s {row['jaxgen_per_image_s'] * 1e3:11.1f}ms "
              f"{row['diffusers_per_image_s'] * 1e3:14.1f}ms {row['max_abs_diff']:11.2e} {row['ours_over_peer']:10.2f}")
    print("ours/peer (time per image): " + ", ".join(f"{s} steps {row['ours_over_peer']:.2f}"
                                                   for s, row in r["steps"].items()))


if __name__ == "__main__":
    main()
