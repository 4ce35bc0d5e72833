"""EulerAncestralDiscreteScheduler: Euler steps down to sigma_down plus fresh noise of sigma_up
(k-diffusion's ancestral sampler), diffusers' fields."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion import schedules as sch
from jaxgen.diffusion.schedulers.base import (
    F32, Scheduler, alphas_cumprod_table, check_num_steps, require_noise)
from jaxgen.diffusion.schedulers.euler import EulerState
from jaxgen.diffusion.schedulers.sigma_base import (
    init_noise_sigma, scale_by_sigma, sigma_ladder, ve_add_noise, ve_predict_x0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EulerAncestralDiscreteScheduler(Scheduler):
    """Fields and defaults are diffusers' EulerAncestralDiscreteScheduler. Stochastic: every step
    takes ``noise``. prediction_type='sample' is implemented here (diffusers raises on it)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    supported: ClassVar = {
        "beta_schedule": sch.BETA_SCHEDULES,
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": sch.SPACINGS,
    }
    stochastic: ClassVar[bool] = True

    def _setup(self):
        ac = alphas_cumprod_table(self, zero_snr_floor=True)
        train = sch.sigmas_from_alphas_cumprod(ac)
        self._set(alphas_cumprod_np=ac, alphas_cumprod=jnp.asarray(ac), train_sigmas=jnp.asarray(train))

    def set_timesteps(self, num_inference_steps: int, *, sample_shape=None) -> EulerState:
        """Host: the state for n steps; state.timesteps [n] float32, state.sigmas [n + 1]."""
        T = self.num_train_timesteps
        n = check_num_steps("EulerAncestralDiscreteScheduler", num_inference_steps, T)
        ts = sch.spaced_timesteps_float(self.timestep_spacing, T, n, self.steps_offset)
        sigmas, ts, _ = sigma_ladder(self, ts, n, self.alphas_cumprod_np)
        sig32 = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return EulerState(timesteps=jnp.asarray(np.asarray(ts).astype(np.float32)),
                          sigmas=jnp.asarray(sig32),
                          init_noise_sigma=jnp.asarray(init_noise_sigma(sig32, self.timestep_spacing)),
                          num_inference_steps=n)

    def scale_model_input(self, state: EulerState, sample: jax.Array, i) -> jax.Array:
        """x / sqrt(sigma_i^2 + 1)."""
        return scale_by_sigma(sample, state.sigmas[jnp.asarray(i, jnp.int32)])

    def step(self, state: EulerState, model_output: jax.Array, i, sample: jax.Array, noise=None):
        """One ancestral step at index i. model_output, sample, noise: [B, ...].
        Returns (prev_sample, state)."""
        i = jnp.asarray(i, jnp.int32)   # an array index: one compiled gather, not one per step
        dtype = sample.dtype
        x = sample.astype(F32)
        mo = model_output.astype(F32)
        noise = require_noise(noise, x, "EulerAncestralDiscreteScheduler", "is ancestral (stochastic)")
        sigma = state.sigmas[i]
        x0 = ve_predict_x0(self.prediction_type, x, mo, sigma)
        s_from, s_to = sigma, state.sigmas[i + 1]
        sigma_up = jnp.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
        # = s_to^4 / s_from^2 >= 0 in exact arithmetic; clamp float32 rounding below zero
        sigma_down = jnp.sqrt(jnp.maximum(s_to * s_to - sigma_up * sigma_up, 0.0))
        d = (x - x0) / sigma
        prev = x + d * (sigma_down - sigma) + noise * sigma_up
        return prev.astype(dtype), state

    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps, state=None):
        """x0 + sigma noise; see sigma_base.ve_add_noise for how sigma is found."""
        return ve_add_noise(state, self.train_sigmas, original_samples, noise, timesteps)
