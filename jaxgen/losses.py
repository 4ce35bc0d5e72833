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
