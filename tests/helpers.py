"""Plain helpers shared by the parity tests: error measures, NHWC <-> NCHW layout changes, and
perturbed weights for the save-then-reload direction.

Import them as ``from helpers import rel_err, nchw``: tests/ is no package, and pytest (rootdir
/work/main, the default "prepend" import mode) puts tests/ on sys.path for the test modules and
conftest.py, in the main process and in every pytest-xdist worker alike.
torch is imported only when ``nchw`` is called, so a test file that skips without torch still imports.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _host(x) -> np.ndarray:
    """A numpy / jax array or a torch tensor as a float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().numpy()
    return np.asarray(x, np.float64)


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| over all elements, in float64. Arrays or torch tensors of equal shape."""
    ours, ref = _host(ours), _host(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def rel_errors(ours, ref) -> list[float]:
    """``rel_err`` of each pair of the two sequences (e.g. each step of two sampling trajectories)."""
    return [rel_err(a, b) for a, b in zip(ours, ref)]


def nchw(x):
    """A channels-last array [B, ..., C] (e.g. NHWC) as a torch tensor [B, C, ...] of the same dtype
    (a C-contiguous copy: writable, sharing no memory with ``x``)."""
    import torch

    return torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())


def nhwc(t) -> np.ndarray:
    """A channels-first torch tensor [B, C, ...] (e.g. NCHW) as a numpy array [B, ..., C]."""
    return np.moveaxis(t.detach().numpy(), 1, -1)


def perturbed(params, seed: int):
    """New weights near the old ones: each leaf + 0.05 (std + 0.1) N(0, 1), drawn on the host
    with NumPy (no per-shape compilation). params: a pytree of arrays -> the same of jax arrays."""
    rng = np.random.default_rng(seed)

    def bump(p):
        p = np.asarray(p)
        return jnp.asarray(p + 0.05 * (np.std(p) + 0.1) * rng.standard_normal(p.shape).astype(p.dtype))

    return jax.tree_util.tree_map(bump, params)
