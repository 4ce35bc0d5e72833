"""HeunDiscreteScheduler: Heun's second-order method in sigma (Karras et al. 2022, Algorithm 1),
diffusers' fields. Two model calls per step: the ladder has 2n - 1 entries."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion import schedules as sch
from jaxgen.diffusion.schedulers.base import F32, Scheduler, alphas_cumprod_table, check_num_steps
from jaxgen.diffusion.schedulers.sigma_base import (
    init_noise_sigma, scale_by_sigma, sigma_ladder, ve_add_noise, ve_predict_x0)
from jaxgen.errors import ConfigError


@flax.struct.dataclass
class HeunState:
    """timesteps: [2n - 1] float32 (the first, then every later one twice); sigmas: [2n] float32.

    Entries alternate between an Euler predictor (``second`` False) and the trapezoidal corrector
    that reuses the predictor's start point, derivative and dt (``second`` True).
    """
    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    second: jax.Array                      # [] bool
    dt: jax.Array                          # [] float32
    prev_derivative: jax.Array | None
    saved_sample: jax.Array | None
    num_inference_steps: int = flax.struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeunDiscreteScheduler(Scheduler):
    """Fields and defaults are diffusers' HeunDiscreteScheduler (note beta_start 0.00085 and
    beta_end 0.012 by default)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    supported: ClassVar = {
        "beta_schedule": sch.BETA_SCHEDULES,
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": sch.SPACINGS,
    }
    order: ClassVar[int] = 2

    def _validate(self):
        if sum([bool(self.use_karras_sigmas), bool(self.use_exponential_sigmas),
                bool(self.use_beta_sigmas)]) > 1:
            raise ConfigError("HeunDiscreteScheduler: set at most one of use_karras_sigmas, "
                              "use_exponential_sigmas, use_beta_sigmas.")

    def _setup(self):
        ac = alphas_cumprod_table(self)
        train = sch.sigmas_from_alphas_cumprod(ac)
        self._set(alphas_cumprod_np=ac, alphas_cumprod=jnp.asarray(ac), train_sigmas=jnp.asarray(train))

    def set_timesteps(self, num_inference_steps: int, *, sample_shape=None) -> HeunState:
        """Host: the state for n Heun steps; state.timesteps [2n - 1] float32, state.sigmas [2n].
        sample_shape: allocate the predictor buffers now (needed inside lax.scan)."""
        T = self.num_train_timesteps
        n = check_num_steps("HeunDiscreteScheduler", num_inference_steps, T)
        ts = sch.spaced_timesteps_float(self.timestep_spacing, T, n, self.steps_offset)
        sigmas, ts, _ = sigma_ladder(self, ts, n, self.alphas_cumprod_np)
        sig = np.concatenate([sigmas, [0.0]]).astype(np.float32)            # [n + 1]
        sig = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])   # [2n]
        ts = np.asarray(ts)
        ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)]).astype(np.float32)  # [2n - 1]
        state = HeunState(timesteps=jnp.asarray(ts), sigmas=jnp.asarray(sig),
                          init_noise_sigma=jnp.asarray(init_noise_sigma(sig, self.timestep_spacing)),
                          second=jnp.asarray(False), dt=jnp.asarray(0.0, F32),
                          prev_derivative=None, saved_sample=None, num_inference_steps=n)
        if sample_shape is not None:
            state = self.with_buffers(state, jnp.zeros(sample_shape, F32))
        return state

    def with_buffers(self, state: HeunState, sample: jax.Array) -> HeunState:
        if state.prev_derivative is not None:
            return state
        z = jnp.zeros(sample.shape, F32)
        return state.replace(prev_derivative=z, saved_sample=z)

    def scale_model_input(self, state: HeunState, sample: jax.Array, i) -> jax.Array:
        """x / sqrt(sigma_i^2 + 1)."""
        return scale_by_sigma(sample, state.sigmas[jnp.asarray(i, jnp.int32)])

    def step(self, state: HeunState, model_output: jax.Array, i, sample: jax.Array, noise=None):
        """Predictor or corrector at index i (state.second says which).
        model_output, sample: [B, ...]. Returns (prev_sample, state)."""
        i = jnp.asarray(i, jnp.int32)   # an array index: one compiled gather, not one per step
        state = self.with_buffers(state, sample)
        dtype = sample.dtype
        x = sample.astype(F32)
        mo = model_output.astype(F32)
        second = state.second
        sig = state.sigmas
        i_prev = jnp.maximum(jnp.asarray(i) - 1, 0)
        sigma = jnp.where(second, sig[i_prev], sig[i])
        sigma_next = jnp.where(second, sig[i], sig[i + 1])
        sigma_in = jnp.where(second, sigma_next, sigma)
        x0 = ve_predict_x0(self.prediction_type, x, mo, sigma_in)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # predictor (Euler) from sigma to sigma_next
        d1 = (x - x0) / sigma
        dt1 = sigma_next - sigma
        # corrector: average of the predictor's slope and the slope at its end point
        d2 = (state.prev_derivative + (x - x0) / sigma_next) / 2
        prev = jnp.where(second, state.saved_sample + d2 * state.dt, x + d1 * dt1)
        zero = jnp.zeros_like(x)
        state = state.replace(second=~second,
                              dt=jnp.where(second, 0.0, dt1),
                              prev_derivative=jnp.where(second, zero, d1),
                              saved_sample=jnp.where(second, zero, x))
        return prev.astype(dtype), state

    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps, state=None):
        """x0 + sigma noise; see sigma_base.ve_add_noise for how sigma is found."""
        return ve_add_noise(state, self.train_sigmas, original_samples, noise, timesteps)
