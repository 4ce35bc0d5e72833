"""Host-side batching in chunks: run a jitted function over N examples a few rows at a time.

Inference over a whole dataset (encoding a training set once, sampling 720 prompts, decoding
codes) must neither hold N examples on the device at once nor compile one program per N. Every
such loop in jaxgen goes through ``map_chunked``: rows are cut into chunks of at most ``size``,
each chunk is padded to a fixed shape, and the padding rows are dropped from the result.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in blocks of ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"chunk size {size} must be >= 1")
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def pad_rows(x: np.ndarray, size: int, mode: str = "edge") -> np.ndarray:
    """x [n, ...] with n <= size -> [size, ...]: the extra rows repeat x's last row ("edge") or
    are zeros ("zeros"). Padding rows are computed and thrown away, so they only need valid values."""
    x = np.asarray(x)
    if len(x) == size:
        return x
    if not 0 < len(x) <= size:
        raise ValueError(f"pad_rows: {len(x)} rows do not fit a chunk of {size}")
    if mode == "edge":
        fill = np.repeat(x[-1:], size - len(x), axis=0)
    elif mode == "zeros":
        fill = np.zeros((size - len(x), *x.shape[1:]), x.dtype)
    else:
        raise ValueError(f"pad_rows mode={mode!r}: use 'edge' or 'zeros'")
    return np.concatenate([x, fill])


def chunk_size(n: int, max_size: int, power_of_two: bool = False) -> int:
    """The padded size of a chunk of ``n`` rows: ``max_size`` (one compiled shape for every chunk),
    or with ``power_of_two`` the next power of two up to ``max_size`` (a few compiled shapes, less
    padding for small calls)."""
    if power_of_two:
        return min(max_size, 1 << max(n - 1, 0).bit_length())
    return max_size


def map_chunked(fn: Callable[..., object], arrays: Sequence[np.ndarray], max_size: int, *,
                power_of_two: bool = False, pad: str = "edge") -> object:
    """``fn(*chunk)`` over row chunks of ``arrays`` (all [N, ...]), results concatenated on the host.

    fn: takes one chunk of each array ([size, ...] each, padded) and returns an array [size, ...]
        or a tuple/dict of them; typically a jitted function with its parameters bound.
    max_size: rows per call; with power_of_two each chunk is padded to the next power of two
        (at most max_size), else to min(max_size, N).
    Returns what fn returns, with every array [N, ...] as host NumPy (padding rows removed).
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"map_chunked: arrays have different lengths {[len(a) for a in arrays]}")
    if n == 0:
        raise ValueError("map_chunked: no rows to process")
    top = max_size if power_of_two else min(max_size, n)
    outs = []
    for a, b in chunk_bounds(n, max_size):
        size = chunk_size(b - a, top, power_of_two)
        out = fn(*(pad_rows(x[a:b], size, pad) for x in arrays))
        outs.append(_map(lambda y: np.asarray(y)[:b - a], out))
    first = outs[0]
    if isinstance(first, dict):
        return {k: np.concatenate([o[k] for o in outs]) for k in first}
    if isinstance(first, tuple):
        return tuple(np.concatenate([o[i] for o in outs]) for i in range(len(first)))
    return np.concatenate(outs)


def _map(f, out):
    if isinstance(out, dict):
        return {k: f(v) for k, v in out.items()}
    if isinstance(out, tuple):
        return tuple(f(v) for v in out)
    return f(out)
