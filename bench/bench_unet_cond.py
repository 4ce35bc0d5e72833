"""UNet2DConditionModel: jaxgen vs diffusers on the same weights, shapes and machine.

    JAX_PLATFORMS=cpu python bench/bench_unet_cond.py [--preset small|sd15] [--batch 2] [--iters 5]
                                                      [--dtype float32|bfloat16] [--threads 1]

Presets: ``small`` (CPU: latent 16x16x4, block_out_channels (32, 64, 64), cross-attention 128,
77 tokens) and ``sd15`` (Stable Diffusion 1.5's U-Net shape at 64x64 latents: for a GPU).
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
    "small": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  layers_per_block=1, cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16),
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    setup_threads(args.threads)

    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    import jaxgen

    gpu = jax.default_backend() == "gpu"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    peer = TorchUNet(**cfg)
    randomize_(peer)
    folder = tempfile.mkdtemp(prefix="bench_unet_cond_")
    peer.save_pretrained(folder)
    module, params = jaxgen.load_pretrained(folder)
    jdtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    module = module.clone(dtype=jdtype, attention_impl="auto")
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    peer = peer.to(device=device, dtype=tdtype)
    nparams = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))

    rng = np.random.default_rng(0)
    b, s, c = args.batch, cfg["sample_size"], cfg["in_channels"]
    x = rng.standard_normal((b, s, s, c)).astype(np.float32)
    ctx = rng.standard_normal((b, 77, cfg["cross_attention_dim"])).astype(np.float32)
    t = rng.integers(0, 1000, b).astype(np.int32)
    eps = rng.standard_normal((b, s, s, c)).astype(np.float32)
    xj, ctxj, tj, epsj = (jnp.asarray(a) for a in (x, ctx, t, eps))
    pt = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    x_pt, ctx_pt = pt(x.transpose(0, 3, 1, 2)).to(tdtype), pt(ctx).to(tdtype)
    t_pt, eps_pt = pt(t.astype(np.int64)), pt(eps.transpose(0, 3, 1, 2)).to(tdtype)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    print(f"UNet2DConditionModel preset {args.preset}: {nparams / 1e6:.1f} M params; batch {b} x {s}x{s}x{c}, "
          f"context 77x{cfg['cross_attention_dim']}, {args.dtype}; jax {jax.__version__} on {jax.default_backend()}, "
          f"torch {torch.__version__} on {device}; {args.threads} CPU thread(s)")

    rows = []
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
    ours_fwd = median_time(lambda: fwd_c(params, xj, tj, ctxj).block_until_ready(), args.iters)

    def peer_fwd_call():
        with torch.no_grad():
            peer(x_pt, t_pt, ctx_pt)
        sync()

    peer_fwd_call()
    peer_fwd = median_time(peer_fwd_call, args.iters)
    rows.append(("forward", compile_fwd, ours_fwd, peer_fwd, compiled_flops(fwd_c)))

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

    ours_train()
    ours_tr = median_time(ours_train, args.iters)
    peer.train()
    opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=1e-2)

    def peer_train():
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((peer(x_pt, t_pt, ctx_pt).sample.float() - eps_pt.float()) ** 2)
        loss.backward()
        opt.step()
        sync()

    peer_train()
    peer_tr = median_time(peer_train, args.iters)
    rows.append(("train step", compile_train, ours_tr, peer_tr, compiled_flops(step_c)))

    print(f"forward parity: rel. error {err:.2e} ({args.dtype})")
    print(f"{'':12s} {'jaxgen compile':>15s} {'jaxgen':>11s} {'diffusers':>11s} {'TFLOP/s':>9s} {'ours/peer':>10s}")
    for name, comp, ours_t, peer_t, flops in rows:
        tflops = f"{flops / ours_t / 1e12:9.2f}" if flops else f"{'-':>9s}"
        print(f"{name:12s} {comp:14.2f}s {ours_t * 1e3:9.1f}ms {peer_t * 1e3:9.1f}ms {tflops} {ours_t / peer_t:10.2f}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
