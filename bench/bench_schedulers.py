"""Benchmark: a whole sampling loop of each scheduler, jaxgen's compiled lax.scan against
diffusers' Python loop, driven by the same small stand-in model.

    JAX_PLATFORMS=cpu python bench/bench_schedulers.py [--steps 50] [--shape 1,64,64,4]

The stand-in model is a per-pixel two-layer MLP over the channels (C -> hidden -> C, tanh), the
same weights on both sides, so the timing is dominated by the scheduler and the loop machinery,
not by convolutions. Per scheduler it prints: jaxgen's compile time, the median time of one
whole loop for jaxgen (compiled, warm) and diffusers (torch, eager), the relative difference of
the final samples (same initial noise and the same per-step variance noise), and last the ratio
ours / peer (below 1: jaxgen is faster).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.sampling import sample_loop, step_noise
from jaxgen.diffusion.schedulers import scheduler_from_config

CONFIGS = [
    {"_class_name": "DDPMScheduler"},
    {"_class_name": "DDIMScheduler"},
    {"_class_name": "PNDMScheduler", "skip_prk_steps": True},
    {"_class_name": "LMSDiscreteScheduler"},
    {"_class_name": "EulerDiscreteScheduler"},
    {"_class_name": "EulerAncestralDiscreteScheduler"},
    {"_class_name": "HeunDiscreteScheduler"},
    {"_class_name": "DPMSolverMultistepScheduler"},
    {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    {"_class_name": "UniPCMultistepScheduler", "solver_order": 3},
]
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shape", default="1,64,64,4", help="B,H,W,C of the sample (NHWC)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--only", default=None, help="comma-separated class names to run")
    args = parser.parse_args(argv)
    import torch
    import diffusers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    shape = tuple(int(v) for v in args.shape.split(","))
    c = shape[-1]
    r = np.random.RandomState(0)
    w1 = (r.randn(c, args.hidden) / np.sqrt(c)).astype(np.float32)
    w2 = (r.randn(args.hidden, c) / np.sqrt(args.hidden)).astype(np.float32)
    tw = (r.randn(args.hidden) * 0.01).astype(np.float32)
    init = r.randn(*shape).astype(np.float32)
    jw1, jw2, jtw = map(jnp.asarray, (w1, w2, tw))
    pw1, pw2, ptw = map(torch.from_numpy, (w1, w2, tw))

    def jax_model(x, t, cond):                       # x: [B, H, W, C]
        h = jnp.tanh(x @ jw1 + jtw * jnp.asarray(t, jnp.float32) / 1000.0)
        return h @ jw2

    def torch_model(x, t):                           # x: [B, C, H, W]
        h = torch.tanh(torch.einsum("bchw,cd->bhwd", x, pw1) + ptw * float(t) / 1000.0)
        return torch.einsum("bhwd,dc->bchw", h, pw2)

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); diffusers {diffusers.__version__}")
    print(f"{args.steps} inference steps, sample {shape}, MLP hidden {args.hidden}, median of "
          f"{args.repeats}")
    header = (f"{'scheduler':44s} {'loop':>5s} {'compile s':>9s} {'jaxgen ms':>10s} "
              f"{'diffusers ms':>12s} {'final rel diff':>14s} {'ours/peer':>9s}")
    print(header)
    print("-" * len(header))
    ratios = []
    key = jax.random.key(0)
    only = set(args.only.split(",")) if args.only else None
    for cfg in CONFIGS:
        if only and cfg["_class_name"] not in only:
            continue
        cfg = {**cfg, **SD}
        s = scheduler_from_config(cfg)
        state = s.set_timesteps(args.steps)
        n = len(state.timesteps)
        run = jax.jit(lambda st, x: sample_loop(s, st, jax_model, x, key=key))
        t0 = time.perf_counter()
        compiled = run.lower(state, jnp.asarray(init)).compile()
        compile_s = time.perf_counter() - t0
        ours = np.asarray(compiled(state, jnp.asarray(init)))
        t_ours = median_time(lambda: compiled(state, jnp.asarray(init)).block_until_ready(), args.repeats)

        # the same per-step noise for diffusers
        noises = (np.stack([np.asarray(step_noise(key, jnp.int32(i), jnp.zeros(shape))) for i in range(n)])
                  if s.needs_noise() else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
        module = sys.modules[type(ref).__module__]
        current = [0]

        def fake_randn(shape_, generator=None, device=None, dtype=None, layout=None):
            return torch.from_numpy(np.moveaxis(noises[current[0]], -1, 1).copy())

        def peer_loop():
            ref.set_timesteps(args.steps)
            x = torch.from_numpy(np.moveaxis(init, -1, 1).copy()) * ref.init_noise_sigma
            with torch.no_grad():
                for k, t in enumerate(ref.timesteps):
                    current[0] = k
                    out = torch_model(ref.scale_model_input(x, t), t)
                    x = ref.step(out, t, x).prev_sample
            return x

        original = getattr(module, "randn_tensor", None)
        if noises is not None:
            module.randn_tensor = fake_randn
        try:
            peer = np.moveaxis(peer_loop().numpy(), 1, -1)
            t_peer = median_time(peer_loop, args.repeats)
        finally:
            if original is not None:
                module.randn_tensor = original
        diff = float(np.linalg.norm(ours - peer) / np.linalg.norm(peer))
        ratio = t_ours / t_peer
        ratios.append(ratio)
        name = cfg["_class_name"] + (f"({cfg['algorithm_type']})" if "algorithm_type" in cfg else "")
        print(f"{name:44s} {n:5d} {compile_s:9.2f} {t_ours * 1e3:10.2f} {t_peer * 1e3:12.2f} "
              f"{diff:14.1e} {ratio:9.3f}")
    print(f"geometric mean ours/peer over {len(ratios)} schedulers: "
          f"{float(np.exp(np.mean(np.log(ratios)))):.3f}")


if __name__ == "__main__":
    main()
