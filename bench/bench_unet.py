"""UNet2DModel: jaxgen vs diffusers on the same weights, shapes and machine.

    JAX_PLATFORMS=cpu python bench/bench_unet.py [--batch 16] [--size 32] [--iters 10] [--ddim-steps 50]
                                                 [--threads 1]

Measures, in float32 and after warm-up (medians):
  forward   one denoiser call on [B, size, size, 3] at random timesteps;
  train     forward + backward + AdamW update on the epsilon-prediction MSE;
  ddim      a whole DDIM sampling loop (jaxgen: one compiled lax.scan; diffusers: the Python loop
            of DDIMScheduler.step over the torch model), when jaxgen.diffusion is present.
jaxgen's compile time is reported apart from step time. On CPU, XLA's convolutions are slower than
torch's oneDNN kernels (about 2.5x on the machines this project was measured on), which dominates
these small convolutional models; the ratio ours/peer is printed last.

--threads sets torch's intra-op thread count; with 1, XLA's multi-threaded Eigen kernels are off
too (--xla_cpu_multi_thread_eigen=false), otherwise XLA uses all cores. On a machine shared with
other jobs use 1: with more OpenMP threads than free cores, torch's spin-waiting threads slow it
down by 10-30x, which would flatter jaxgen.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time as _median_time, randomize_, setup_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--ddim-iters", type=int, default=3)
    ap.add_argument("--block-out-channels", type=str, default="32,64,128")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    setup_threads(args.threads)  # before jax starts: XLA reads its flags once

    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from diffusers import UNet2DModel as TorchUNet2DModel

    import jaxgen

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    boc = tuple(int(c) for c in args.block_out_channels.split(","))
    n = len(boc)
    down = tuple("AttnDownBlock2D" if i == n - 2 else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if i == 1 else "UpBlock2D" for i in range(n))
    cfg = dict(sample_size=args.size, in_channels=3, out_channels=3, block_out_channels=boc,
               down_block_types=down, up_block_types=up, layers_per_block=2, norm_num_groups=8,
               attention_head_dim=32)
    peer = TorchUNet2DModel(**cfg)
    randomize_(peer)  # no zero-initialised layers: every weight random
    folder = tempfile.mkdtemp(prefix="bench_unet_")
    peer.save_pretrained(folder)
    module, params = jaxgen.load_pretrained(folder)
    nparams = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))

    rng = np.random.default_rng(0)
    b, s = args.batch, args.size
    x = rng.standard_normal((b, s, s, 3)).astype(np.float32)
    noise = rng.standard_normal((b, s, s, 3)).astype(np.float32)
    t = rng.integers(0, 1000, b).astype(np.int32)
    x_pt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # NCHW for diffusers
    noise_pt = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    t_pt = torch.from_numpy(t.astype(np.int64))
    xj, noisej, tj = jnp.asarray(x), jnp.asarray(noise), jnp.asarray(t)

    print(f"UNet2DModel {boc}, layers_per_block=2, attention at level {n - 2}; {nparams / 1e6:.2f} M params; "
          f"batch {b} x {s}x{s}x3 float32; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__}; {args.threads} thread(s) each")
    rows = []

    # ---- forward ------------------------------------------------------------------------------
    fwd = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, xj, tj).compile()
    compile_fwd = time.perf_counter() - t0
    ours = np.asarray(compiled(params, xj, tj))
    peer.eval()
    with torch.no_grad():
        ref = peer(x_pt, t_pt).sample.numpy().transpose(0, 2, 3, 1)
    err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    for _ in range(2):
        compiled(params, xj, tj).block_until_ready()
    ours_fwd = _median_time(lambda: compiled(params, xj, tj).block_until_ready(), args.iters)
    with torch.no_grad():
        for _ in range(2):
            peer(x_pt, t_pt)
        peer_fwd = _median_time(lambda: peer(x_pt, t_pt), args.iters)
    rows.append(("forward", compile_fwd, ours_fwd, peer_fwd))

    # ---- training step: MSE(eps_pred, noise) + AdamW -----------------------------------------
    tx = optax.adamw(1e-4, weight_decay=1e-2)
    opt_state = tx.init(params)

    def train_step(p, o, x, t, eps):
        def loss_fn(p):
            return jnp.mean((module.apply({"params": p}, x, t) - eps) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    step_c = step.lower(params, opt_state, xj, tj, noisej).compile()
    compile_train = time.perf_counter() - t0
    p_train = jax.tree_util.tree_map(jnp.copy, params)
    state = {"p": p_train, "o": opt_state}

    def ours_train():
        state["p"], state["o"], loss = step_c(state["p"], state["o"], xj, tj, noisej)
        loss.block_until_ready()

    for _ in range(2):
        ours_train()
    ours_tr = _median_time(ours_train, args.iters)

    initial_state = {k: v.clone() for k, v in peer.state_dict().items()}
    peer.train()
    opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=1e-2)

    def peer_train():
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((peer(x_pt, t_pt).sample - noise_pt) ** 2)
        loss.backward()
        opt.step()

    for _ in range(2):
        peer_train()
    peer_tr = _median_time(peer_train, args.iters)
    rows.append(("train step", compile_train, ours_tr, peer_tr))

    # ---- DDIM sampling loop -----------------------------------------------------------------
    from diffusers import DDIMScheduler as TorchDDIM

    from jaxgen.diffusion.sampling import sample_loop

    sched_cfg = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                 "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    sched = jaxgen.scheduler_from_config(sched_cfg)
    sstate = sched.set_timesteps(args.ddim_steps)

    def sample(p, z):
        return sample_loop(sched, sstate, lambda xin, tt, _: module.apply({"params": p}, xin, tt), z)

    sample_j = jax.jit(sample)
    t0 = time.perf_counter()
    sample_c = sample_j.lower(params, noisej).compile()
    compile_ddim = time.perf_counter() - t0
    sample_c(params, noisej).block_until_ready()
    ours_ddim = _median_time(lambda: sample_c(params, noisej).block_until_ready(), args.ddim_iters)

    peer.load_state_dict(initial_state)  # the same weights as jaxgen's again (training changed them)
    peer.eval()
    tsched = TorchDDIM.from_config({k: v for k, v in sched_cfg.items() if k != "_class_name"})

    def peer_sample():
        tsched.set_timesteps(args.ddim_steps)
        z = noise_pt.clone()
        with torch.no_grad():
            for tt in tsched.timesteps:
                z = tsched.step(peer(z, tt).sample, tt, z).prev_sample
        return z

    with torch.no_grad():
        peer(x_pt, t_pt)
    peer_ddim = _median_time(peer_sample, args.ddim_iters)
    ref_ddim = peer_sample().numpy().transpose(0, 2, 3, 1)
    ddim_err = float(np.linalg.norm(np.asarray(sample_c(params, noisej)) - ref_ddim) / np.linalg.norm(ref_ddim))
    rows.append((f"ddim {args.ddim_steps} steps", compile_ddim, ours_ddim, peer_ddim))

    print(f"forward parity: rel. error {err:.2e}; DDIM loop rel. error {ddim_err:.2e}")
    print(f"{'':18s} {'jaxgen compile':>15s} {'jaxgen':>11s} {'diffusers':>11s} {'ours/peer':>10s}")
    for name, comp, ours_t, peer_t in rows:
        print(f"{name:18s} {comp:14.2f}s {ours_t * 1e3:9.1f}ms {peer_t * 1e3:9.1f}ms {ours_t / peer_t:10.2f}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
