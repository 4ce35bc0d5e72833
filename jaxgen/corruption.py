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


def num_kept_patches(num_patches: int, mask_ratio: float) -> int:
    """How many of ``num_patches`` stay visible at ``mask_ratio``: round(N * (1 - ratio)), >= 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must lie in [0, 1): at least one patch stays visible.")
    return max(1, int(round(num_patches * (1.0 - mask_ratio))))


def random_masking(key: jax.Array, n: int, num_patches: int, mask_ratio: float):
    """Per-example random patch masks of fixed size (jittable): argsort of uniform noise.

    Returns
      ids_keep:    int32 [n, K], the visible patches of each example (K = num_kept_patches), in
                   the shuffled order the encoder sees them;
      ids_restore: int32 [n, N], the inverse permutation: position j of the unshuffled sequence
                   is element ids_restore[:, j] of [kept tokens, mask tokens];
      mask:        float32 [n, N], 1 = masked (hidden from the encoder), 0 = visible.
    """
    keep = num_kept_patches(num_patches, mask_ratio)
    noise = jax.random.uniform(key, (n, num_patches))
    ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)     # [n, N] a random permutation per row
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)  # its inverse
    shuffled_mask = (jnp.arange(num_patches) >= keep).astype(jnp.float32)  # [N]: first K visible
    mask = jnp.take_along_axis(jnp.broadcast_to(shuffled_mask, (n, num_patches)), ids_restore, axis=1)
    return ids_shuffle[:, :keep], ids_restore, mask


def occlude(key: jax.Array, x: jax.Array, min_size: int, max_size: int, fill: float = 0.0):
    """Hide one random rectangle per image (``random_rectangles``) behind the value ``fill``.

    x: [B, H, W, C] in [-1, 1]. Returns (occluded x, hole float32 [B, H, W, 1], 1 = hidden).
    fill 0.0 is mid-grey, a value the pure-colour shapes never take, so the hole is visible.
    """
    hole = random_rectangles(key, x.shape, min_size, max_size)
    return jnp.where(hole > 0, jnp.asarray(fill, x.dtype), x), hole


# ITU-R BT.601 luma weights (R, G, B): the grey value a colour image is reduced to.
LUMA = (0.299, 0.587, 0.114)


def to_grey(x: jax.Array) -> jax.Array:
    """Luminance of RGB images replicated to 3 channels: [B, H, W, 3] -> [B, H, W, 3].

    Linear in the pixel values, so it holds in [-1, 1] and in [0, 1] alike.
    """
    if x.shape[-1] != 3:
        raise ValueError(f"to_grey takes RGB images [..., 3], got {x.shape}")
    y = x[..., 0:1] * LUMA[0] + x[..., 1:2] * LUMA[1] + x[..., 2:3] * LUMA[2]
    return jnp.broadcast_to(y, x.shape)
