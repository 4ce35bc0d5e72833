"""CLIP text encoder: compile and run time with the layers unrolled and with ``scan_layers=True``.

    JAX_PLATFORMS=cpu python bench/bench_scan_layers.py [--preset small|sd15] [--batch 2] [--iters 5]
                                                        [--threads 1]

Presets: ``sd15`` (Stable Diffusion 1.5's text encoder, CLIP ViT-L/14's text tower: width 768,
12 layers, 77 tokens; the default) and ``small`` (width 64, 12 layers: compile time without the
large matmuls). For each setting it lowers and compiles the forward pass and the gradient of a
scalar loss (the shape of a training step) and times both (medians after warm-up). The outputs of
the two settings are compared (they are the same function). The ratio scanned / unrolled is printed
last; the peer here is jaxgen's own unrolled encoder (the scan changes nothing torch could run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time, setup_threads  # noqa: E402

PRESETS = {
    "sd15": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77),
    "small": dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=12,
                  num_attention_heads=4, max_position_embeddings=77),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    setup_threads(args.threads)

    import jax
    import jax.numpy as jnp

    from jaxgen.nn.clip import CLIPTextModel

    cfg = PRESETS[args.preset]
    base = CLIPTextModel(**cfg)
    rng = np.random.RandomState(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.02 * rng.randn(*s.shape), s.dtype),
                                    base.abstract_params())
    ids = jnp.asarray(rng.randint(0, cfg["vocab_size"] - 1, (args.batch, cfg["max_position_embeddings"])),
                      jnp.int32)
    rows, outs = {}, {}
    for scan in (False, True):
        module = base.clone(scan_layers=scan)
        fwd = jax.jit(lambda p, m=module: m.apply({"params": p}, ids).last_hidden_state)
        grad = jax.jit(jax.grad(lambda p, m=module: jnp.mean(m.apply({"params": p}, ids).pooler_output ** 2)))
        row = {}
        for name, fn in (("forward", fwd), ("grad", grad)):
            t0 = time.perf_counter()
            compiled = fn.lower(params).compile()
            row[f"{name}_compile_s"] = time.perf_counter() - t0
            jax.block_until_ready(compiled(params))
            row[f"{name}_run_s"] = median_time(lambda c=compiled: jax.block_until_ready(c(params)), args.iters)
            if name == "forward":
                outs[scan] = np.asarray(compiled(params))
        rows[scan] = row
        print(f"scan_layers={scan!s:5}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    err = float(np.abs(outs[True] - outs[False]).max())
    print(f"{args.preset}: {cfg['num_hidden_layers']} layers, width {cfg['hidden_size']}, batch {args.batch}, "
          f"{jax.default_backend()}; max |scanned - unrolled| = {err:.2e}")
    print("ratio scanned / unrolled: " + "  ".join(
        f"{k} {rows[True][k] / rows[False][k]:.2f}" for k in rows[True]))


if __name__ == "__main__":
    main()
