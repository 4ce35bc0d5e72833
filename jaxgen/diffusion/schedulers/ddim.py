"""DDIMScheduler: denoising diffusion implicit models (Song et al. 2021), diffusers' fields."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion import schedules as sch
from jaxgen.diffusion.schedulers.base import (
    F32, Scheduler, alphas_cumprod_table, bcast, check_num_steps, check_zero_snr_epsilon,
    require_noise, threshold_sample, vp_predict_eps, vp_predict_x0)


@flax.struct.dataclass
class DDIMState:
    """timesteps: [N] int32 descending. ``step`` goes from timesteps[i] to timesteps[i] - step_ratio
    (diffusers' rule, whatever the spacing), with alpha_bar = final_alpha_cumprod below 0."""
    timesteps: jax.Array
    init_noise_sigma: jax.Array            # [] float32, 1.0
    num_inference_steps: int = flax.struct.field(pytree_node=False)
    step_ratio: int = flax.struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDIMScheduler(Scheduler):
    """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z, s = eta sigma_t (eta=0: ODE).

    Fields and defaults are diffusers' DDIMScheduler. ``step(..., eta=, noise=)``: with eta > 0
    the step adds eta-scaled posterior noise, given as ``noise``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    supported: ClassVar = {
        "beta_schedule": sch.BETA_SCHEDULES,
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": sch.SPACINGS,
    }

    def _setup(self):
        ac = alphas_cumprod_table(self)
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        self._set(alphas_cumprod_np=ac, alphas_cumprod=jnp.asarray(ac),
                  final_alpha_cumprod=jnp.asarray(final, F32))

    def needs_noise(self, eta=0.0, **_) -> bool:
        return not (isinstance(eta, (int, float)) and eta == 0)

    def set_timesteps(self, num_inference_steps: int, *, sample_shape=None) -> DDIMState:
        """Host: the state for n steps; state.timesteps [n] int32 descending (diffusers' ladder).
        sample_shape is accepted for a uniform interface (DDIM keeps no buffers)."""
        T = self.num_train_timesteps
        n = check_num_steps("DDIMScheduler", num_inference_steps, T)
        ts = sch.spaced_timesteps(self.timestep_spacing, T, n, self.steps_offset)
        check_zero_snr_epsilon("DDIMScheduler", self, self.alphas_cumprod_np, ts)
        return DDIMState(timesteps=jnp.asarray(ts, jnp.int32), init_noise_sigma=jnp.asarray(1.0, F32),
                         num_inference_steps=n, step_ratio=T // n)

    def step(self, state: DDIMState, model_output: jax.Array, i, sample: jax.Array, noise=None,
             eta: float = 0.0, use_clipped_model_output: bool = False):
        """One DDIM step at index i. model_output, sample, noise: [B, ...]. eta: Python float or a
        traced scalar (traced: noise is required). Returns (prev_sample, state)."""
        i = jnp.asarray(i, jnp.int32)   # an array index: one compiled gather, not one per step
        dtype = sample.dtype
        x = sample.astype(F32)
        mo = model_output.astype(F32)
        t = state.timesteps[i]
        prev_t = t - state.step_ratio
        ac = self.alphas_cumprod
        a_t = ac[t]
        a_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], self.final_alpha_cumprod)
        beta_prod_t = 1.0 - a_t

        alpha_t, sigma_t = jnp.sqrt(a_t), jnp.sqrt(beta_prod_t)
        x0 = vp_predict_x0(self.prediction_type, x, mo, alpha_t, sigma_t)
        eps = vp_predict_eps(self.prediction_type, x, mo, alpha_t, sigma_t)
        if self.thresholding:
            x0 = threshold_sample(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        elif self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)

        variance = (1.0 - a_prev) / beta_prod_t * (1.0 - a_t / a_prev)
        std = eta * jnp.sqrt(variance)
        if use_clipped_model_output:
            eps = vp_predict_eps("sample", x, x0, alpha_t, sigma_t)
        direction = jnp.sqrt(1.0 - a_prev - std * std) * eps
        prev = jnp.sqrt(a_prev) * x0 + direction
        if self.needs_noise(eta=eta):
            noise = require_noise(noise, x, "DDIMScheduler", "has eta != 0")
            prev = prev + std * noise
        return prev.astype(dtype), state

    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps,
                  state=None) -> jax.Array:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; timesteps: [B] or scalar training timesteps.
        ``state`` is accepted for a uniform interface and not needed (alpha_bar depends on t only)."""
        a = bcast(self.alphas_cumprod[jnp.asarray(timesteps)], original_samples)
        return jnp.sqrt(a) * original_samples + jnp.sqrt(1.0 - a) * noise

    def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
        a = bcast(self.alphas_cumprod[jnp.asarray(timesteps)], sample)
        return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * sample
