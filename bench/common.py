"""What the benchmarks share: thread set-up, medians, random torch weights, FLOP counts."""
from __future__ import annotations

import os
import statistics
import time


def setup_threads(threads: int) -> None:
    """Call before importing jax/torch. With 1 thread XLA's multi-threaded Eigen kernels are off
    too; on a machine shared with other jobs use 1 (torch's spinning OpenMP threads otherwise slow
    it down 10-30x, which would flatter jaxgen)."""
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def median_time(fn, iters: int) -> float:
    """Median wall time of ``fn()`` over ``iters`` calls (seconds)."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def randomize_(model, scale: float = 0.3) -> None:
    """Every torch weight random (diffusers zero-initialises some output layers)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (scale / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1))


def compiled_flops(compiled) -> float | None:
    """FLOPs XLA counts for a compiled jax function (None when the backend does not say)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return None if not analysis or "flops" not in analysis else float(analysis["flops"])
