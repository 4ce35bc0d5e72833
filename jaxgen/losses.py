"""Losses. Every function returns a scalar mean over the batch unless it says otherwise."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all elements (float32)."""
    return jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)


def l1_sparsity(code: jax.Array) -> jax.Array:
    """Mean over the batch of the L1 norm of each code: code [B, ...] -> scalar."""
    return jnp.mean(jnp.sum(jnp.abs(code.astype(jnp.float32)).reshape(code.shape[0], -1), axis=-1))


def bernoulli_nll(logits: jax.Array, target01: jax.Array) -> jax.Array:
    """-log p(target | logits) summed per example, mean over the batch (nats).

    logits: [B, ...]; target01: same shape, in [0, 1] (soft targets allowed).
    """
    per = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), target01.astype(jnp.float32))
    return jnp.mean(jnp.sum(per.reshape(per.shape[0], -1), axis=-1))


def gaussian_kl_standard(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed per example, mean over the batch (nats)."""
    kl = 0.5 * (mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.mean(jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1))


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """MSE over the elements where mask == 1 (mask broadcastable to pred)."""
    mask = jnp.broadcast_to(mask, pred.shape).astype(jnp.float32)
    err = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def normalize_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Each patch standardised by its own mean and variance (MAE's norm_pix_loss target).

    patches: [B, N, P] -> [B, N, P] float32; a constant patch becomes zeros.
    """
    p = patches.astype(jnp.float32)
    mean = jnp.mean(p, axis=-1, keepdims=True)
    var = jnp.var(p, axis=-1, keepdims=True)
    return (p - mean) / jnp.sqrt(var + eps)


def masked_patch_loss(pred: jax.Array, patches: jax.Array, mask: jax.Array,
                      norm_pix: bool = False) -> jax.Array:
    """MAE loss: per-patch MSE averaged over the masked patches only.

    pred, patches: [B, N, P] (P = p*p*C pixel values per patch); mask: [B, N], 1 = masked.
    norm_pix: compare against each target patch standardised by its own statistics
    (``normalize_patches``) instead of the raw pixels. Visible patches do not contribute.
    """
    target = normalize_patches(patches) if norm_pix else patches.astype(jnp.float32)
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)  # [B, N]
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)
