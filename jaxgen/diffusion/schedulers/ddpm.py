"""DDPMScheduler: ancestral sampling of the reverse process (Ho et al. 2020), diffusers' fields."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion import schedules as sch
from jaxgen.diffusion.schedulers.base import (
    F32, Scheduler, alphas_cumprod_table, bcast, check_num_steps, check_zero_snr_epsilon,
    require_noise, threshold_sample, vp_predict_x0)
from jaxgen.errors import ConfigError, DataError

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                  "learned_range")


@flax.struct.dataclass
class DDPMState:
    """timesteps: [N] int32 descending; prev_timesteps: [N] int32, the next entry (-1 at the end)."""
    timesteps: jax.Array
    prev_timesteps: jax.Array
    init_noise_sigma: jax.Array            # [] float32, 1.0
    num_inference_steps: int = flax.struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDPMScheduler(Scheduler):
    """Denoising diffusion probabilistic model sampler: x_{t-1} ~ q(x_{t-1} | x_t, x0_pred).

    Fields and defaults are diffusers' DDPMScheduler. Stochastic: ``step`` takes the step's noise.
    variance_type: fixed_small (posterior variance), fixed_small_log (same, through its log),
    fixed_large (beta_t), fixed_large_log (beta_t through its log; diffusers returns NaN here, see
    docs/SCHEDULERS.md), learned (the model's second half of channels is the variance),
    learned_range (it interpolates log variance between the two fixed ones, in [-1, 1]).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    supported: ClassVar = {
        "beta_schedule": sch.BETA_SCHEDULES,
        "variance_type": VARIANCE_TYPES,
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": sch.SPACINGS,
    }
    stochastic: ClassVar[bool] = True

    def _setup(self):
        ac = alphas_cumprod_table(self)
        self._set(alphas_cumprod_np=ac, alphas_cumprod=jnp.asarray(ac))

    # -- timesteps --------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, *,
                      timesteps: Sequence[int] | None = None, sample_shape=None) -> DDPMState:
        """Host: the state for n steps (or a custom strictly descending ``timesteps`` list);
        state.timesteps [N] int32. sample_shape is accepted for a uniform interface (no buffers)."""
        T = self.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ConfigError("DDPMScheduler.set_timesteps: pass exactly one of num_inference_steps "
                             "and timesteps.")
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.int64)
            if ts.ndim != 1 or ts.size == 0 or np.any(np.diff(ts) >= 0) or ts[0] >= T or ts[-1] < 0:
                raise ConfigError("DDPMScheduler.set_timesteps: custom timesteps must be a non-empty, "
                                 f"strictly descending list in [0, {T - 1}].")
        else:
            n = check_num_steps("DDPMScheduler", num_inference_steps, T)
            ts = sch.spaced_timesteps(self.timestep_spacing, T, n, self.steps_offset)
        check_zero_snr_epsilon("DDPMScheduler", self, self.alphas_cumprod_np, ts)
        prev = np.concatenate([ts[1:], [-1]])
        return DDPMState(timesteps=jnp.asarray(ts, jnp.int32), prev_timesteps=jnp.asarray(prev, jnp.int32),
                         init_noise_sigma=jnp.asarray(1.0, F32), num_inference_steps=int(ts.size))

    # -- step -------------------------------------------------------------------------------
    def step(self, state: DDPMState, model_output: jax.Array, i, sample: jax.Array, noise=None):
        """One reverse step at index i. model_output: [B, ..., C] (or [B, ..., 2C] with a learned
        variance); sample, noise: [B, ..., C]. Returns (prev_sample, state)."""
        i = jnp.asarray(i, jnp.int32)   # an array index: one compiled gather, not one per step
        dtype = sample.dtype
        x = sample.astype(F32)
        mo = model_output.astype(F32)
        predicted_variance = None
        if self.variance_type in ("learned", "learned_range"):
            c = x.shape[-1]
            if mo.shape[-1] != 2 * c:
                raise DataError(f"DDPMScheduler: variance_type={self.variance_type!r} needs a model "
                                 f"output with 2 x {c} channels (mean, variance), got {mo.shape[-1]}.")
            mo, predicted_variance = mo[..., :c], mo[..., c:]
        noise = require_noise(noise, x, "DDPMScheduler", "adds the posterior variance")

        t = state.timesteps[i]
        prev_t = state.prev_timesteps[i]
        ac = self.alphas_cumprod
        a_t = ac[t]
        a_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], 1.0)
        beta_prod_t = 1.0 - a_t
        beta_prod_prev = 1.0 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1.0 - cur_alpha

        x0 = vp_predict_x0(self.prediction_type, x, mo, jnp.sqrt(a_t), jnp.sqrt(beta_prod_t))
        if self.thresholding:
            x0 = threshold_sample(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        elif self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)

        coef_x0 = jnp.sqrt(a_prev) * cur_beta / beta_prod_t
        coef_xt = jnp.sqrt(cur_alpha) * beta_prod_prev / beta_prod_t
        mean = coef_x0 * x0 + coef_xt * x

        var = jnp.maximum(beta_prod_prev / beta_prod_t * cur_beta, 1e-20)
        vt = self.variance_type
        if vt == "fixed_small":
            std = jnp.sqrt(var)
        elif vt == "fixed_small_log":
            std = jnp.exp(0.5 * jnp.log(var))
        elif vt == "fixed_large":
            std = jnp.sqrt(cur_beta)
        elif vt == "fixed_large_log":
            std = jnp.exp(0.5 * jnp.log(cur_beta))
        elif vt == "learned":
            std = jnp.sqrt(predicted_variance)
        else:  # learned_range: model output in [-1, 1] -> log variance between the fixed ones
            frac = (predicted_variance + 1.0) / 2.0
            std = jnp.exp(0.5 * (frac * jnp.log(cur_beta) + (1.0 - frac) * jnp.log(var)))
        prev = jnp.where(t > 0, mean + std * noise, mean)
        return prev.astype(dtype), state

    # -- forward process --------------------------------------------------------------------
    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps,
                  state=None) -> jax.Array:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise. x0, noise: [B, ...]; timesteps: [B] or scalar
        training timesteps (int).
        ``state`` is accepted for a uniform interface and not needed (alpha_bar depends on t only)."""
        a = bcast(self.alphas_cumprod[jnp.asarray(timesteps)], original_samples)
        return jnp.sqrt(a) * original_samples + jnp.sqrt(1.0 - a) * noise

    def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (the v_prediction training target)."""
        a = bcast(self.alphas_cumprod[jnp.asarray(timesteps)], sample)
        return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * sample

    def _validate(self):
        if self.clip_sample_range <= 0:
            raise ConfigError("DDPMScheduler: clip_sample_range must be > 0.")
