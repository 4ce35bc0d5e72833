"""Shared parts of the k-diffusion-style schedulers (LMS, Euler, Euler ancestral, Heun).

They sample the variance-exploding form x = x0 + sigma eps, with the model fed
x / sqrt(sigma^2 + 1); ``state.sigmas`` holds one noise level per step plus the final one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion import schedules as sch
from jaxgen.diffusion.schedulers.base import F32, bcast, index_for_timestep
from jaxgen.errors import ConfigError


def sigma_ladder(cfg, timesteps: np.ndarray, n: int, alphas_cumprod: np.ndarray,
                 sigma_min=None, sigma_max=None):
    """Interpolated training sigmas at ``timesteps`` (float64), re-spaced when the config asks
    for karras / exponential / beta sigmas (then the timesteps follow the sigmas).

    Returns (sigmas float64 [n], timesteps [n], log_sigmas float32 [T]).
    """
    train = sch.sigmas_from_alphas_cumprod(alphas_cumprod)             # [T] float32
    log_sigmas = np.log(train)
    sigmas = np.interp(timesteps, np.arange(0, len(train)), train)    # float64
    kind = None
    if getattr(cfg, "use_karras_sigmas", False):
        kind = "karras"
    elif getattr(cfg, "use_exponential_sigmas", False):
        kind = "exponential"
    elif getattr(cfg, "use_beta_sigmas", False):
        kind = "beta"
    if kind is not None:
        sigmas = sch.convert_sigmas(kind, sigmas, n, sigma_min, sigma_max)
        timesteps = sch.sigma_to_t(sigmas, log_sigmas)
    return sigmas, timesteps, log_sigmas


def init_noise_sigma(sigmas_f32: np.ndarray, spacing: str) -> np.ndarray:
    """sigma_max for linspace / trailing spacing, sqrt(sigma_max^2 + 1) for leading (float32)."""
    m = np.max(sigmas_f32).astype(np.float32)
    if spacing in ("linspace", "trailing"):
        return m
    return np.sqrt(m * m + np.float32(1.0)).astype(np.float32)


def scale_by_sigma(sample: jax.Array, sigma: jax.Array) -> jax.Array:
    """x / sqrt(sigma^2 + 1): the model input of the VE form (float32 math, sample's dtype out)."""
    return (sample.astype(F32) / jnp.sqrt(sigma * sigma + 1.0)).astype(sample.dtype)


def ve_predict_x0(prediction_type: str, sample: jax.Array, model_output: jax.Array,
                  sigma: jax.Array) -> jax.Array:
    """The x0 ("predicted original sample") a model output means at noise level sigma, in the VE
    form the k-diffusion-style schedulers use (diffusers' formulas):

    epsilon:                   x - sigma out
    v_prediction:              out (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)
    sample / original_sample:  out

    sample (x), model_output (out): [B, ...] float32; sigma: [] float32 (or broadcastable to them).
    Returns [B, ...] float32. Any other prediction_type is a ConfigError.
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / jnp.sqrt(sigma * sigma + 1.0)) + sample / (sigma * sigma + 1.0)
    if prediction_type in ("sample", "original_sample"):
        return model_output
    raise ConfigError(f"prediction_type={prediction_type!r} is not implemented; choose one of "
                      "epsilon, v_prediction, sample.")


def ve_add_noise(state, train_sigmas: jax.Array, original_samples, noise, timesteps):
    """x0 + sigma(t) noise. With a state, sigma is the schedule's own at the index of t in
    state.timesteps (diffusers' rule: t must be one of them; otherwise the result is NaN); without
    one, the training sigma linearly interpolated at t (exact for integer t)."""
    t = jnp.asarray(timesteps)
    if state is None:
        sigma = jnp.interp(t.astype(F32), jnp.arange(train_sigmas.shape[0], dtype=F32), train_sigmas)
    else:
        idx = index_for_timestep(state.timesteps, t, missing_is_last=False)
        sigma = jnp.where(idx >= 0, state.sigmas[jnp.maximum(idx, 0)], jnp.nan)
    return original_samples + noise * bcast(sigma, original_samples)
