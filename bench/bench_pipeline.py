"""Stable Diffusion text-to-image: jaxgen vs diffusers, a whole pipeline call on the same weights.

    JAX_PLATFORMS=cpu python bench/bench_pipeline.py [--size 64] [--batch 1] [--steps 8,50]
                                                     [--iters 3] [--threads 1]

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


def build(folder: str, size: int) -> None:
    """A small SD-1.x-shaped pipeline: VAE factor 4 (latents size/4), a 2-level U-Net with
    cross-attention and a cross-attention mid block, a 2-layer CLIP text encoder of width 64."""
    import diffusers
    import transformers

    from jaxgen.tokenizer import train_tokenizer

    tok = train_tokenizer(CAPTIONS * 2, 700, os.path.join(folder, "_tok"))
    pt_tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"))
    text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)), 3)
    vae = randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=size), 2)
    unet = randomize(diffusers.UNet2DConditionModel(
        sample_size=size // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=8), 1)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=pt_tok,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(folder, "sd"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 4)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per call")
    ap.add_argument("--steps", type=str, default="8,50")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    setup_threads(args.threads)          # before jax starts: XLA reads its flags once

    import diffusers
    import jax
    import torch

    import jaxgen

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads)
    steps_list = [int(s) for s in args.steps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, args.size)
        folder = os.path.join(tmp, "sd")
        t0 = time.perf_counter()
        ours = jaxgen.StableDiffusionPipeline.from_pretrained(folder)
        load_s = time.perf_counter() - t0
        peer = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False)
        peer.set_progress_bar_config(disable=True)
    prompts = (CAPTIONS * args.batch)[: args.batch]
    negative = ["a green triangle"] * args.batch
    h = args.size // ours.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((args.batch, h, h, 4)).astype(np.float32)
    latents_pt = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    n_unet = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(ours.params["unet"]))
    print(f"SD pipeline, {args.size}x{args.size} images, latents {h}x{h}x4, batch {args.batch}, "
          f"U-Net {n_unet / 1e6:.2f} M params; threads {args.threads}; jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__}; jaxgen load {load_s:.2f}s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    rows = []
    for steps in steps_list:
        def run_ours():
            return ours(prompts, negative, num_inference_steps=steps, guidance_scale=7.5, latents=latents)

        def run_peer():
            with torch.no_grad():
                return peer(prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
                            height=args.size, width=args.size, latents=latents_pt, output_type="np").images

        t0 = time.perf_counter()
        first = run_ours()
        first_s = time.perf_counter() - t0
        ours_t = median_time(run_ours, args.iters)
        ref = run_peer()                                          # warm-up
        peer_t = median_time(run_peer, args.iters)
        err = float(np.max(np.abs(first.astype(np.float64) - ref)))
        rows.append((steps, max(first_s - ours_t, 0.0), ours_t / args.batch, peer_t / args.batch, err))

    print(f"{'steps':>5s} {'jaxgen compile':>15s} {'jaxgen/image':>13s} {'diffusers/image':>16s} "
          f"{'max |diff|':>11s} {'ours/peer':>10s}")
    for steps, comp, o, p, err in rows:
        print(f"{steps:5d} {comp:14.2f}s {o * 1e3:11.1f}ms {p * 1e3:14.1f}ms {err:11.2e} {o / p:10.2f}")
    print("ours/peer (time per image): " + ", ".join(f"{s} steps {o / p:.2f}" for s, _, o, p, _ in rows))


if __name__ == "__main__":
    main()
