"""The forward diffusion process and the quantities training steps need, as pure functions.

A ``Schedule`` (jaxgen.diffusion.schedules) is data; every function here takes it with arrays:
``x0``, ``xt``, ``eps`` are [B, ...] float (NHWC images in [-1, 1] for x0, unit Gaussian eps);
``t`` is [B] int32 training timesteps in [0, T-1] (a scalar broadcasts). Per-timestep
coefficients are gathered as ``s.alpha_bar[t]`` and broadcast over the trailing axes.

Parametrisations (alpha_bar = a, Ho et al. 2020; Salimans & Ho 2022 for v):
  x_t = sqrt(a) x0 + sqrt(1 - a) eps
  v   = sqrt(a) eps - sqrt(1 - a) x0
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.diffusion.schedules import Schedule
from jaxgen.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _at(values: jax.Array, t, like: jax.Array) -> jax.Array:
    """values[t] shaped to broadcast against ``like``: t [B] -> [B, 1, ..., 1]; scalar t -> []."""
    v = values[jnp.asarray(t)]
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def q_sample(s: Schedule, x0: jax.Array, t, eps: jax.Array) -> jax.Array:
    """Draw x_t ~ q(x_t | x_0) = N(sqrt(a_t) x0, (1 - a_t) I), with the noise given.

    x0, eps: [B, ...] float32; t: [B] int32 (or scalar). Returns x_t, [B, ...] float32.
    Equals diffusers' ``scheduler.add_noise(x0, eps, t)`` for the DDPM/DDIM/PNDM schedulers.
    """
    a = _at(s.alpha_bar, t, x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps


def posterior_mean_variance(s: Schedule, x0: jax.Array, xt: jax.Array, t):
    """The true posterior q(x_{t-1} | x_t, x_0) = N(mean, var I).

    x0, xt: [B, ...]; t: [B] int32 (alpha_bar_{-1} = 1 at t = 0).
    Returns (mean [B, ...], var [B, 1, ...], log_var [B, 1, ...]); log_var = log(max(var, 1e-20)).
    mean = beta_t sqrt(a_{t-1}) / (1 - a_t) x0 + (1 - a_{t-1}) sqrt(alpha_t) / (1 - a_t) x_t,
    var  = beta_t (1 - a_{t-1}) / (1 - a_t).
    beta_t is read from the table. (DDPMScheduler.step, like diffusers, forms it as
    1 - a_t / a_{t-1} in float32, which loses digits at small t: 2.5e-5 relative at t = 1.)
    """
    a_prev_all = jnp.concatenate([jnp.ones((1,), s.alpha_bar.dtype), s.alpha_bar[:-1]])
    a = _at(s.alpha_bar, t, x0)
    a_prev = _at(a_prev_all, t, x0)
    beta = _at(s.betas, t, x0)
    alpha = _at(s.alphas, t, x0)
    mean = beta * jnp.sqrt(a_prev) / (1.0 - a) * x0 + (1.0 - a_prev) * jnp.sqrt(alpha) / (1.0 - a) * xt
    var = beta * (1.0 - a_prev) / (1.0 - a)
    return mean, var, jnp.log(jnp.maximum(var, 1e-20))


def x0_from_eps(s: Schedule, xt: jax.Array, t, eps: jax.Array) -> jax.Array:
    """x0 = (x_t - sqrt(1 - a) eps) / sqrt(a). Shapes as q_sample."""
    a = _at(s.alpha_bar, t, xt)
    return (xt - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)


def eps_from_x0(s: Schedule, xt: jax.Array, t, x0: jax.Array) -> jax.Array:
    """eps = (x_t - sqrt(a) x0) / sqrt(1 - a). Shapes as q_sample."""
    a = _at(s.alpha_bar, t, xt)
    return (xt - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


def v_from_x0_eps(s: Schedule, x0: jax.Array, eps: jax.Array, t) -> jax.Array:
    """v = sqrt(a) eps - sqrt(1 - a) x0 (diffusers' ``get_velocity(x0, eps, t)``)."""
    a = _at(s.alpha_bar, t, x0)
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0


def x0_from_v(s: Schedule, xt: jax.Array, t, v: jax.Array) -> jax.Array:
    """x0 = sqrt(a) x_t - sqrt(1 - a) v."""
    a = _at(s.alpha_bar, t, xt)
    return jnp.sqrt(a) * xt - jnp.sqrt(1.0 - a) * v


def eps_from_v(s: Schedule, xt: jax.Array, t, v: jax.Array) -> jax.Array:
    """eps = sqrt(a) v + sqrt(1 - a) x_t."""
    a = _at(s.alpha_bar, t, xt)
    return jnp.sqrt(a) * v + jnp.sqrt(1.0 - a) * xt


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type={prediction_type!r} is not implemented "
                          f"(use one of {', '.join(PREDICTION_TYPES)}).")


def predict_x0_and_eps(s: Schedule, prediction_type: str, xt: jax.Array, t, model_output: jax.Array):
    """Turn a model output of any parametrisation into (x0, eps) predictions. Shapes as q_sample."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x0_from_eps(s, xt, t, model_output), model_output
    if prediction_type == "sample":
        return model_output, eps_from_x0(s, xt, t, model_output)
    return x0_from_v(s, xt, t, model_output), eps_from_v(s, xt, t, model_output)


def training_target(s: Schedule, prediction_type: str, x0: jax.Array, eps: jax.Array, t) -> jax.Array:
    """What a DDPM-style model regresses: eps ('epsilon'), v ('v_prediction') or x0 ('sample').

    x0, eps: [B, ...] float32; t: [B] int32. Returns [B, ...] float32.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return v_from_x0_eps(s, x0, eps, t)


def snr(s: Schedule, t) -> jax.Array:
    """Signal-to-noise ratio a_t / (1 - a_t): t [B] int32 -> [B] float32 (inf where a_t = 1)."""
    a = s.alpha_bar[jnp.asarray(t)]
    return a / (1.0 - a)


def min_snr_weights(s: Schedule, t, gamma: float = 5.0, prediction_type: str = "epsilon") -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023), per example: t [B] int32 -> [B] float32.

    The weight turns the per-example MSE on the model's own target into the MSE on x0 clipped at
    SNR gamma: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v_prediction,
    min(SNR, gamma) for sample. At SNR = 0 (zero-terminal-SNR schedules) the epsilon weight is its
    limit, 1.
    """
    _check_prediction_type(prediction_type)
    r = snr(s, t)
    clipped = jnp.minimum(r, gamma)
    if prediction_type == "epsilon":
        return jnp.where(r > 0, clipped / jnp.where(r > 0, r, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (r + 1.0)
    return clipped
