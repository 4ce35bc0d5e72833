"""EulerDiscreteScheduler: Euler's method on the probability-flow ODE in sigma (Karras et al.
2022, Algorithm 2 with optional churn), diffusers' fields."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion import schedules as sch
from jaxgen.diffusion.schedulers.base import (
    F32, Scheduler, alphas_cumprod_table, check_num_steps, require_noise)
from jaxgen.diffusion.schedulers.sigma_base import (
    init_noise_sigma, scale_by_sigma, sigma_ladder, ve_add_noise, ve_predict_x0)
from jaxgen.errors import ConfigError


@flax.struct.dataclass
class EulerState:
    """timesteps: [N] float32 (what the model is fed); sigmas: [N + 1] float32."""
    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    num_inference_steps: int = flax.struct.field(pytree_node=False)


def _is_zero(v) -> bool:
    return isinstance(v, (int, float)) and v == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class EulerDiscreteScheduler(Scheduler):
    """Fields and defaults are diffusers' EulerDiscreteScheduler. ``step(..., s_churn=0.0,
    s_tmin=0.0, s_tmax=inf, s_noise=1.0, noise=None)``: with s_churn > 0 the step first raises the
    noise level (then it needs ``noise``)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    supported: ClassVar = {
        "beta_schedule": sch.BETA_SCHEDULES,
        "prediction_type": ("epsilon", "sample", "original_sample", "v_prediction"),
        "interpolation_type": ("linear", "log_linear"),
        "timestep_spacing": sch.SPACINGS,
        "timestep_type": ("discrete", "continuous"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def _validate(self):
        if sum([bool(self.use_karras_sigmas), bool(self.use_exponential_sigmas),
                bool(self.use_beta_sigmas)]) > 1:
            raise ConfigError("EulerDiscreteScheduler: set at most one of use_karras_sigmas, "
                              "use_exponential_sigmas, use_beta_sigmas.")

    def _setup(self):
        ac = alphas_cumprod_table(self, zero_snr_floor=True)
        train = sch.sigmas_from_alphas_cumprod(ac)
        self._set(alphas_cumprod_np=ac, alphas_cumprod=jnp.asarray(ac), train_sigmas=jnp.asarray(train))

    def needs_noise(self, s_churn=0.0, **_) -> bool:
        return not _is_zero(s_churn)

    def set_timesteps(self, num_inference_steps: int, *, sample_shape=None) -> EulerState:
        """Host: the state for n steps; state.timesteps [n] float32, state.sigmas [n + 1]
        float32 ([n + 2] with interpolation_type='log_linear', as diffusers). No buffers."""
        T = self.num_train_timesteps
        n = check_num_steps("EulerDiscreteScheduler", num_inference_steps, T)
        ac = self.alphas_cumprod_np
        ts = sch.spaced_timesteps_float(self.timestep_spacing, T, n, self.steps_offset)
        if self.interpolation_type == "log_linear":
            train = sch.sigmas_from_alphas_cumprod(ac)
            logs = np.log(train)
            # n + 1 levels from sigma_max to sigma_min, evenly in log sigma (float32 like torch)
            sigmas = np.exp(sch.linspace_f32(float(logs[-1]), float(logs[0]), n + 1))
            sigmas = sigmas.astype(np.float64)
            if self.use_karras_sigmas or self.use_exponential_sigmas or self.use_beta_sigmas:
                kind = ("karras" if self.use_karras_sigmas else
                        "exponential" if self.use_exponential_sigmas else "beta")
                sigmas = sch.convert_sigmas(kind, sigmas, n, self.sigma_min, self.sigma_max)
                ts = sch.sigma_to_t(sigmas, logs)
        else:
            sigmas, ts, _ = sigma_ladder(self, ts, n, ac, self.sigma_min, self.sigma_max)
        if self.final_sigmas_type == "sigma_min":
            last = np.sqrt((np.float32(1.0) - ac[0]) / ac[0])
        else:
            last = 0.0
        sig32 = np.concatenate([sigmas, [last]]).astype(np.float32)
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            ts = (np.float32(0.25) * np.log(sig32[:-1])).astype(np.float32)
        return EulerState(timesteps=jnp.asarray(np.asarray(ts).astype(np.float32)),
                          sigmas=jnp.asarray(sig32),
                          init_noise_sigma=jnp.asarray(init_noise_sigma(sig32, self.timestep_spacing)),
                          num_inference_steps=n)

    def scale_model_input(self, state: EulerState, sample: jax.Array, i) -> jax.Array:
        """x / sqrt(sigma_i^2 + 1)."""
        return scale_by_sigma(sample, state.sigmas[jnp.asarray(i, jnp.int32)])

    def step(self, state: EulerState, model_output: jax.Array, i, sample: jax.Array, noise=None,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
             s_noise: float = 1.0):
        """One Euler step at index i from sigma_i (raised to sigma_hat by churn) to sigma_{i+1}.
        model_output, sample, noise: [B, ...]. Returns (prev_sample, state)."""
        i = jnp.asarray(i, jnp.int32)   # an array index: one compiled gather, not one per step
        dtype = sample.dtype
        x = sample.astype(F32)
        mo = model_output.astype(F32)
        sigma = state.sigmas[i]
        n_sigmas = state.sigmas.shape[0]
        if _is_zero(s_churn):
            sigma_hat = sigma
        else:
            gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax),
                              jnp.minimum(s_churn / (n_sigmas - 1), math.sqrt(2.0) - 1.0), 0.0)
            sigma_hat = sigma * (gamma + 1.0)
            noise = require_noise(noise, x, "EulerDiscreteScheduler", "has s_churn > 0")
            bump = noise * s_noise * jnp.sqrt(sigma_hat * sigma_hat - sigma * sigma)
            x = jnp.where(gamma > 0, x + bump, x)
        # as diffusers: epsilon is taken at the churned sigma_hat, v_prediction at sigma
        x0 = ve_predict_x0(self.prediction_type, x, mo,
                           sigma_hat if self.prediction_type == "epsilon" else sigma)
        d = (x - x0) / sigma_hat
        dt = state.sigmas[i + 1] - sigma_hat
        return (x + d * dt).astype(dtype), state

    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps, state=None):
        """x0 + sigma noise; see sigma_base.ve_add_noise for how sigma is found."""
        return ve_add_noise(state, self.train_sigmas, original_samples, noise, timesteps)
