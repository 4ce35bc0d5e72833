"""DiagonalGaussian: the posterior of a VAE encoder, as diffusers' DiagonalGaussianDistribution.

A flax.struct dataclass (a pytree), so modules can return it from ``apply`` and jitted functions
can take it.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers clamps the log-variance to this range


@flax.struct.dataclass
class DiagonalGaussian:
    """N(mean, exp(logvar)) per element. mean, logvar: [B, ...] (NHWC latents or [B, D] codes).

    ``logvar`` is stored clamped to [-30, 20] (diffusers does the same); ``deterministic=True``
    makes the variance zero (sample == mean), as diffusers' ``deterministic`` flag.
    """

    mean: jax.Array
    logvar: jax.Array
    deterministic: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def from_moments(cls, moments: jax.Array, deterministic: bool = False) -> "DiagonalGaussian":
        """Split [..., 2C] into mean [..., C] and logvar [..., C] along the last axis, clamp logvar."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX), deterministic=deterministic)

    @property
    def std(self) -> jax.Array:
        return jnp.zeros_like(self.mean) if self.deterministic else jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.zeros_like(self.mean) if self.deterministic else jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """Reparameterised draw mean + std * eps, eps ~ N(0, I) from ``key``; same shape as mean."""
        eps = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other), other = N(0, I) by default; summed over all but the batch axis: [B]."""
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], self.mean.dtype)
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var
                             - 1.0 - self.logvar + other.logvar, axis=axes)

    def nll(self, x: jax.Array) -> jax.Array:
        """-log N(x; mean, var), summed over all but the batch axis: [B]."""
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], self.mean.dtype)
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(jnp.log(2.0 * jnp.pi) + self.logvar + (x - self.mean) ** 2 / self.var, axis=axes)
