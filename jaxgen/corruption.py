"""Input corruptions for denoising and masked objectives. Explicit key first; shapes kept."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gaussian_noise(key: jax.Array, x: jax.Array, sigma: float) -> jax.Array:
    """x + sigma * eps, eps ~ N(0, I). x: [B, H, W, C] in [-1, 1]; the result is not clipped."""
    return x + sigma * jax.random.normal(key, x.shape, x.dtype)


def masking_noise(key: jax.Array, x: jax.Array, rho: float, fill: float = -1.0) -> jax.Array:
    """Set a random fraction ``rho`` of the input values to ``fill`` (-1 = black in [-1, 1]).

    Each pixel (all its channels together) is dropped independently with probability rho.
    x: [B, H, W, C]; returns the same shape.
    """
    keep = jax.random.bernoulli(key, 1.0 - rho, x.shape[:-1] + (1,))
    return jnp.where(keep, x, jnp.asarray(fill, x.dtype))


def random_rectangles(key: jax.Array, shape: tuple[int, ...], min_size: int, max_size: int) -> jax.Array:
    """One axis-aligned occluder per image: float32 mask [B, H, W, 1], 1 inside the rectangle.

    Sizes are drawn uniformly in [min_size, max_size] per side, positions uniformly so the
    rectangle lies inside the image.
    """
    b, h, w = shape[0], shape[1], shape[2]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    rh = jax.random.randint(k1, (b,), min_size, max_size + 1)
    rw = jax.random.randint(k2, (b,), min_size, max_size + 1)
    top = jnp.floor(jax.random.uniform(k3, (b,)) * (h - rh + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k4, (b,)) * (w - rw + 1)).astype(jnp.int32)
    ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    inside = ((ys >= top[:, None, None]) & (ys < (top + rh)[:, None, None])
              & (xs >= left[:, None, None]) & (xs < (left + rw)[:, None, None]))
    return inside.astype(jnp.float32)[..., None]


def corrupt(key: jax.Array, x: jax.Array, kind: str, *, sigma: float = 0.5, rho: float = 0.3) -> jax.Array:
    """Dispatch by name: "none", "gaussian" (sigma) or "masking" (rho)."""
    if kind == "none":
        return x
    if kind == "gaussian":
        return gaussian_noise(key, x, sigma)
    if kind == "masking":
        return masking_noise(key, x, rho)
    raise ValueError(f"corruption kind {kind!r}: choose 'none', 'gaussian' or 'masking'")
