"""Every performance figure the goals ask for, in one command and one JSON file.

    python bench/run_all.py --preset gpu --out bench.json      # on a GPU machine
    JAX_PLATFORMS=cpu python bench/run_all.py --preset cpu --out bench.json
    make bench                                                 # the cpu preset (gpu when one is found)

What it measures, jaxgen against diffusers on the same random weights, shapes and machine:
  unet_cond   UNet2DConditionModel forward and training step (AdamW, epsilon MSE) at each batch
              of the preset: jaxgen's compile time, step times, diffusers eager (SDPA attention)
              and, on the gpu preset, under torch.compile (its error recorded where it fails);
              TFLOP/s from XLA's FLOP count of the compiled program and MFU against the device's
              dense peak (a table below; null where the device is not in it or on CPU);
  pipeline    a whole Stable Diffusion text-to-image call (tokenise, text encoder, classifier-free
              guidance, DDIM loop, VAE decode): compile time, time per image, max |difference|;
  compile_s   every jaxgen compile time above, by name.
Presets:
  gpu    SD1.5's U-Net (64x64x4 latents, 860 M parameters) in bfloat16 at batch 1 and 16; the
         SD1.5-shaped pipeline at 512x512, 50 steps, bfloat16;
  cpu    the small U-Net (bench/bench_unet_cond.py) in float32 at batch 1 and 4; the small pipeline
         at 64x64, 8 and 50 steps;
  smoke  a one-level U-Net and pipeline, one timing each (tests/test_bench.py runs it so the
         script cannot rot; its times mean nothing).
The JSON: {"preset", "machine": {...}, "unet_cond": {"batch_1": {...}, ...}, "pipeline": {...},
"compile_s": {...}}; every time is in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import setup_threads  # noqa: E402

PRESETS = {
    "gpu": {"unet": "sd15", "dtype": "bfloat16", "batches": (1, 16), "iters": 10, "torch_compile": True,
            "pipeline": {"shape": "sd15", "size": 512, "steps": (50,), "iters": 3}},
    "cpu": {"unet": "small", "dtype": "float32", "batches": (1, 4), "iters": 5, "torch_compile": False,
            "pipeline": {"shape": "small", "size": 64, "steps": (8, 50), "iters": 3}},
    "smoke": {"unet": "tiny", "dtype": "float32", "batches": (1, 2), "iters": 1, "torch_compile": False,
              "pipeline": {"shape": "tiny", "size": 16, "steps": (2,), "iters": 1}},
}
# dense bf16 peak FLOP/s by device kind (vendor data sheets; SXM parts): what MFU is taken against
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
                   "TPU v5e": 197e12, "TPU v5p": 459e12}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak for ``dtype`` (bfloat16 only), matched by name; None if unknown."""
    if dtype != "bfloat16":
        return None
    for name, peak in PEAK_BF16_FLOPS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def run(preset: str, threads: int = 1, log=print) -> dict:
    """Measure ``preset`` (PRESETS) and return the JSON-ready dict (module docstring)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: one of {sorted(PRESETS)}")
    import jax
    import torch

    import bench_pipeline
    import bench_unet_cond

    p = PRESETS[preset]
    device = jax.devices()[0]
    out = {"preset": preset,
           "machine": {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": device.device_kind,
                       "devices": jax.device_count(), "torch": torch.__version__,
                       "torch_cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "threads": threads,
                       "load_average": os.getloadavg()[0], "platform": platform.platform()},
           "unet_cond": {}, "compile_s": {}}
    peak = peak_flops(device.device_kind, p["dtype"]) if jax.default_backend() != "cpu" else None
    for batch in p["batches"]:
        r = bench_unet_cond.measure(bench_unet_cond.PRESETS[p["unet"]], batch, p["dtype"], p["iters"], threads,
                                    p["torch_compile"], log=log)
        r["preset"] = p["unet"]
        for name in ("forward", "train_step"):
            row = r[name]
            row["mfu"] = row["tflops_per_s"] * 1e12 / peak if peak and row["tflops_per_s"] else None
            out["compile_s"][f"unet_cond_{name}_batch_{batch}"] = row["jaxgen_compile_s"]
        out["unet_cond"][f"batch_{batch}"] = r
    q = p["pipeline"]
    r = bench_pipeline.measure(q["size"], 1, q["steps"], q["iters"], q["shape"], p["dtype"], threads, log=log)
    out["pipeline"] = r
    for steps, row in r["steps"].items():
        out["compile_s"][f"pipeline_{q['size']}px_{steps}_steps"] = row["jaxgen_compile_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: gpu when JAX finds a GPU, else cpu")
    ap.add_argument("--out", default="bench.json", help="the JSON file to write")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for XLA and torch (see bench/common.py)")
    args = ap.parse_args()
    setup_threads(args.threads)              # before jax starts: XLA reads its flags once
    preset = args.preset
    if preset is None:
        import jax

        preset = "gpu" if jax.default_backend() == "gpu" else "cpu"
    result = run(preset, args.threads)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}:")
    for key, batch in result["unet_cond"].items():
        for name in ("forward", "train_step"):
            row = batch[name]
            mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") else ""
            print(f"  UNet2DConditionModel {name} {key}: jaxgen {row['jaxgen_s'] * 1e3:.1f} ms, diffusers "
                  f"{row['diffusers_s'] * 1e3:.1f} ms, ours/peer {row['ours_over_peer']:.2f}{mfu}")
    for steps, row in result["pipeline"]["steps"].items():
        print(f"  text-to-image {result['pipeline']['size']}px {steps} steps: jaxgen {row['jaxgen_per_image_s']:.2f} "
              f"s/image, diffusers {row['diffusers_per_image_s']:.2f} s/image, ours/peer {row['ours_over_peer']:.2f}")


if __name__ == "__main__":
    main()
