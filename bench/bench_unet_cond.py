"""UNet2DConditionModel: jaxgen vs diffusers on the same weights, shapes and machine.

    JAX_PLATFORMS=cpu python bench/bench_unet_cond.py [--preset small|sd15] [--batch 2] [--iters 5]
                                                      [--dtype float32|bfloat16] [--threads 1]

Presets: ``tiny`` (one level, for the test of bench/run_all.py), ``small`` (CPU: latent 16x16x4,
block_out_channels (32, 64, 64), cross-attention 128, 77 tokens) and ``sd15`` (Stable Diffusion
1.5's U-Net shape at 64x64 latents: for a GPU). ``measure`` is what bench/run_all.py calls.
Measures forward and training step (forward + backward + AdamW on the epsilon MSE), medians after
warm-up; jaxgen's compile time apart. On a GPU it also reports achieved TFLOP/s from XLA's FLOP
count (SD1.5 forward ≈ 803 GFLOP per image) and uses cuDNN attention in bf16; diffusers runs in
the same dtype (fp16/bf16) with SDPA. The ratio ours/peer is printed last.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compiled_flops, median_time, randomize_, setup_threads  # noqa: E402

PRESETS = {
    "tiny": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,),
                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                 layers_per_block=1, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4),
    "small": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  layers_per_block=1, cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16),
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
}


def measure(cfg: dict, batch: int, dtype: str = "float32", iters: int = 5, threads: int = 1,
            torch_compile: bool = False, log=print) -> dict:
    """Forward and training step of the UNet2DConditionModel ``cfg`` (diffusers' fields) at
    ``batch``: jaxgen (compile time apart) and diffusers on the same random weights; with
    ``torch_compile`` also diffusers under ``torch.compile`` (its error kept when it fails).
    Returns {"params", "forward": {...}, "train_step": {...}, "parity_rel_error", ...}; times in
    seconds, "tflops" from XLA's FLOP count of the compiled program."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    import jaxgen

    gpu = jax.default_backend() == "gpu"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    peer = TorchUNet(**cfg)
    randomize_(peer)
    with tempfile.TemporaryDirectory(prefix="bench_unet_cond_") as folder:
        peer.save_pretrained(folder)
        module, params = jaxgen.load_pretrained(folder)
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    module = module.clone(dtype=jdtype, attention_impl="auto")
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    peer = peer.to(device=device, dtype=tdtype)
    nparams = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))

    rng = np.random.default_rng(0)
    b, s, c = batch, cfg["sample_size"], cfg["in_channels"]
    x = rng.standard_normal((b, s, s, c)).astype(np.float32)
    ctx = rng.standard_normal((b, 77, cfg["cross_attention_dim"])).astype(np.float32)
    t = rng.integers(0, 1000, b).astype(np.int32)
    eps = rng.standard_normal((b, s, s, c)).astype(np.float32)
    xj, ctxj, tj, epsj = (jnp.asarray(a) for a in (x, ctx, t, eps))
    pt = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    x_pt, ctx_pt = pt(x.transpose(0, 3, 1, 2)).to(tdtype), pt(ctx).to(tdtype)
    t_pt, eps_pt = pt(t.astype(np.int64)), pt(eps.transpose(0, 3, 1, 2)).to(tdtype)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    log(f"UNet2DConditionModel: {nparams / 1e6:.1f} M params; batch {b} x {s}x{s}x{c}, "
        f"context 77x{cfg['cross_attention_dim']}, {dtype}; jax {jax.__version__} on {jax.default_backend()}, "
        f"torch {torch.__version__} on {device}; {threads} CPU thread(s)")

    fwd = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    t0 = time.perf_counter()
    fwd_c = fwd.lower(params, xj, tj, ctxj).compile()
    compile_fwd = time.perf_counter() - t0
    ours = np.asarray(fwd_c(params, xj, tj, ctxj), np.float32)
    peer.eval()
    with torch.no_grad():
        ref = peer(x_pt, t_pt, ctx_pt).sample.float().cpu().numpy().transpose(0, 2, 3, 1)
    err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    fwd_c(params, xj, tj, ctxj).block_until_ready()
    ours_fwd = median_time(lambda: fwd_c(params, xj, tj, ctxj).block_until_ready(), iters)

    def peer_forward(model):
        def call():
            with torch.no_grad():
                model(x_pt, t_pt, ctx_pt)
            sync()
        return call

    peer_fwd = median_time(_warm(peer_forward(peer)), iters)

    tx = optax.adamw(1e-4, weight_decay=1e-2)

    def train_step(p, o, x, t, c, e):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((module.apply({"params": p}, x, t, c).astype(jnp.float32) - e) ** 2))(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    state = {"p": jax.tree_util.tree_map(jnp.copy, params)}
    state["o"] = tx.init(state["p"])
    step = jax.jit(train_step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    step_c = step.lower(state["p"], state["o"], xj, tj, ctxj, epsj).compile()
    compile_train = time.perf_counter() - t0

    def ours_train():
        state["p"], state["o"], loss = step_c(state["p"], state["o"], xj, tj, ctxj, epsj)
        loss.block_until_ready()

    ours_tr = median_time(_warm(ours_train), iters)

    def peer_training(model):
        model.train()
        opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=1e-2)

        def call():
            opt.zero_grad(set_to_none=True)
            loss = torch.mean((model(x_pt, t_pt, ctx_pt).sample.float() - eps_pt.float()) ** 2)
            loss.backward()
            opt.step()
            sync()
        return call

    peer_tr = median_time(_warm(peer_training(peer)), iters)
    out = {"params": nparams, "batch": b, "dtype": dtype, "parity_rel_error": err,
           "forward": _row(compile_fwd, ours_fwd, peer_fwd, compiled_flops(fwd_c)),
           "train_step": _row(compile_train, ours_tr, peer_tr, compiled_flops(step_c))}
    if torch_compile:
        for name, make in (("forward", peer_forward), ("train_step", peer_training)):
            try:
                compiled = torch.compile(peer)
                out[name]["diffusers_torch_compile_s"] = median_time(_warm(make(compiled)), iters)
            except Exception as e:  # noqa: BLE001 -- recorded: torch.compile is measured "where it works"
                out[name]["diffusers_torch_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def _warm(fn):
    """``fn`` after one untimed call (warm-up)."""
    fn()
    return fn


def _row(compile_s, ours_s, peer_s, flops) -> dict:
    return {"jaxgen_compile_s": compile_s, "jaxgen_s": ours_s, "diffusers_s": peer_s, "ours_over_peer": ours_s / peer_s,
            "flops": flops, "tflops_per_s": flops / ours_s / 1e12 if flops else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--torch-compile", action="store_true", help="also time diffusers under torch.compile")
    args = ap.parse_args()
    setup_threads(args.threads)
    r = measure(PRESETS[args.preset], args.batch, args.dtype, args.iters, args.threads, args.torch_compile)
    print(f"forward parity: rel. error {r['parity_rel_error']:.2e} ({args.dtype})")
    print(f"{'':12s} {'jaxgen compile':>15s} {'jaxgen':>11s} {'diffusers':>11s} {'TFLOP/s':>9s} {'ours/peer':>10s}")
    for name in ("forward", "train_step"):
        row = r[name]
        tflops = f"{row['tflops_per_s']:9.2f}" if row["tflops_per_s"] else f"{'-':>9s}"
        print(f"{name:12s} {row['jaxgen_compile_s']:14.2f}s {row['jaxgen_s'] * 1e3:9.1f}ms "
              f"{row['diffusers_s'] * 1e3:9.1f}ms {tflops} {row['ours_over_peer']:10.2f}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
