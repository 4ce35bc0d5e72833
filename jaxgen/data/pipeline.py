"""The deterministic, resumable input pipeline.

A batch is a pure function of (seed, step): each epoch is a seeded permutation of the example
indices (remainder dropped), so a resumed run sees exactly the batches the uninterrupted run
would, with no iterator state to checkpoint. Every process computes the same global index list
and reads only its own contiguous slice; ``global_batch`` assembles the slices into one
``jax.Array`` sharded over the mesh's batch axes.
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from jaxgen.errors import DataError


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: int64 [num_examples], a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Global example indices of training step ``step``: int64 [batch_size].

    Epoch e = step // steps_per_epoch uses epoch_permutation(seed, e); within an epoch batches are
    consecutive blocks, and the last partial block is dropped.
    """
    if batch_size > num_examples:
        raise DataError(f"batch_size {batch_size} is larger than the dataset ({num_examples} "
                        "examples): lower --config.batch_size.")
    steps_per_epoch = num_examples // batch_size
    epoch, within = divmod(step, steps_per_epoch)
    perm = epoch_permutation(num_examples, seed, epoch)
    return perm[within * batch_size:(within + 1) * batch_size]


def process_slice(global_batch_size: int, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
    """This process's rows of the global batch (contiguous; equal sizes across processes)."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch_size % pc:
        raise DataError(f"batch_size {global_batch_size} is not divisible by the number of "
                        f"processes ({pc}).")
    per = global_batch_size // pc
    return slice(pi * per, (pi + 1) * per)


def host_batch(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int, step: int) -> dict:
    """This process's part of step ``step``'s batch: {name: array [batch_size / processes, ...]}."""
    n = len(next(iter(arrays.values())))
    idx = batch_indices(n, batch_size, seed, step)[process_slice(batch_size)]
    return {k: v[idx] for k, v in arrays.items()}


def global_batch(local: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
    """Assemble each process's rows into global jax.Arrays with ``sharding`` (batch on axis 0)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def images_to_float(images: jax.Array, dtype=np.float32) -> jax.Array:
    """uint8 [..., H, W, C] in [0, 255] -> float in [-1, 1]."""
    return images.astype(dtype) / 127.5 - 1.0


def images_to_uint8(images, what: str = "the model") -> np.ndarray:
    """float [..., H, W, C] in [-1, 1] (clipped) -> uint8 [0, 255], as host NumPy. A NaN/Inf
    value is a NonFiniteError (it would otherwise become a black pixel); ``what`` names the
    producer in the message."""
    x = np.asarray(jax.device_get(images), dtype=np.float32)
    check_finite_images(x, what)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def unit_to_uint8(images, what: str = "the pipeline") -> np.ndarray:
    """float [..., H, W, C] in [0, 1] (clipped; a pipeline's output) -> uint8 [0, 255]; NaN/Inf
    is a NonFiniteError as in images_to_uint8."""
    x = np.asarray(jax.device_get(images), dtype=np.float32)
    check_finite_images(x, what)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def check_finite_images(x: np.ndarray, what: str) -> None:
    """NonFiniteError naming ``what`` and how many of the images hold NaN/Inf values."""
    bad = ~np.isfinite(x)
    if bad.any():
        from jaxgen.errors import NonFiniteError

        per_image = bad.reshape(bad.shape[0], -1).any(axis=1) if bad.ndim >= 2 else bad
        raise NonFiniteError(
            f"{what} produced NaN/Inf values in {int(per_image.sum())} of {len(per_image)} image(s) "
            f"({int(bad.sum())} values); they would become black pixels. The parameters or the inputs "
            "are not finite: check the checkpoint (a run trained with nan_policy='stop' has finite "
            "ones) and that input images are uint8 or finite floats.")


def box_downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 [N, H/f, W/f, C]: the mean of each f x f block, rounded (the
    low-resolution input of an upscaler)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"box_downsample takes uint8 images [N, H, W, C], got {images.dtype} {images.shape}.")
    n, h, w, c = images.shape
    if h % factor or w % factor:
        raise DataError(f"images of {h}x{w} do not downsample by {factor}: the size must be a multiple of it.")
    x = images.astype(np.float32).reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
