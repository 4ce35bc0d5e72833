"""LMSDiscreteScheduler: linear multistep in sigma (Karras et al. 2022's k-LMS), diffusers' fields."""
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

MAX_LMS_ORDER = 4


@flax.struct.dataclass
class LMSState:
    """timesteps: [N] float32; sigmas: [N + 1] float32 (last 0); coeffs: [N, order] float32, the
    integrated Lagrange weights of step i applied to the newest derivatives first;
    derivatives: [order, ...] float32, newest first (None until allocated)."""
    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    coeffs: jax.Array
    derivatives: jax.Array | None
    num_inference_steps: int = flax.struct.field(pytree_node=False)


def lms_coefficients(sigmas: np.ndarray, order: int) -> np.ndarray:
    """Integrated Lagrange basis weights of the linear multistep method in sigma.

    For step i with p = min(i + 1, order) and nodes sigma[i], sigma[i-1], ..., sigma[i-p+1], weight
    j is the integral from sigma[i] to sigma[i+1] of the Lagrange basis polynomial of node
    sigma[i-j]. Exact polynomial integration in float64 (diffusers uses adaptive quadrature).
    sigmas: [N + 1] float32. Returns [N, order] float32, zero-padded beyond p.
    """
    s = np.asarray(sigmas, np.float64)
    n = s.shape[0] - 1
    out = np.zeros((n, order), np.float64)
    for i in range(n):
        p = min(i + 1, order)
        nodes = [s[i - k] for k in range(p)]
        for j in range(p):
            poly = np.poly1d([1.0])
            for k in range(p):
                if k != j:
                    poly = poly * np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
            prim = np.polyint(poly)
            out[i, j] = prim(s[i + 1]) - prim(s[i])
    return out.astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMSDiscreteScheduler(Scheduler):
    """Fields and defaults are diffusers' LMSDiscreteScheduler. The multistep order (diffusers'
    ``step(order=4)``) is fixed per state: ``set_timesteps(n, order=4)``."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    supported: ClassVar = {
        "beta_schedule": sch.BETA_SCHEDULES,
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": sch.SPACINGS,
    }

    def _validate(self):
        if sum([bool(self.use_karras_sigmas), bool(self.use_exponential_sigmas),
                bool(self.use_beta_sigmas)]) > 1:
            raise ConfigError("LMSDiscreteScheduler: set at most one of use_karras_sigmas, "
                              "use_exponential_sigmas, use_beta_sigmas.")

    def _setup(self):
        ac = alphas_cumprod_table(self)
        train = sch.sigmas_from_alphas_cumprod(ac)
        self._set(alphas_cumprod_np=ac, alphas_cumprod=jnp.asarray(ac), train_sigmas=jnp.asarray(train))

    def set_timesteps(self, num_inference_steps: int, *, order: int = MAX_LMS_ORDER,
                      sample_shape=None) -> LMSState:
        """Host: the state for n steps of the given LMS order (1-4); state.timesteps [n]
        float32, state.sigmas [n + 1], state.coeffs [n, order]. sample_shape: allocate the
        derivative buffer now (needed inside lax.scan)."""
        T = self.num_train_timesteps
        n = check_num_steps("LMSDiscreteScheduler", num_inference_steps, T)
        if not 1 <= int(order) <= MAX_LMS_ORDER:
            raise ConfigError(f"LMSDiscreteScheduler: order={order}; use 1..{MAX_LMS_ORDER}.")
        ts = sch.spaced_timesteps_float(self.timestep_spacing, T, n, self.steps_offset)
        sigmas, ts, _ = sigma_ladder(self, ts, n, self.alphas_cumprod_np)
        sig32 = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        state = LMSState(timesteps=jnp.asarray(np.asarray(ts).astype(np.float32)),
                         sigmas=jnp.asarray(sig32),
                         init_noise_sigma=jnp.asarray(init_noise_sigma(sig32, self.timestep_spacing)),
                         coeffs=jnp.asarray(lms_coefficients(sig32, int(order))),
                         derivatives=None, num_inference_steps=n)
        if sample_shape is not None:
            state = self.with_buffers(state, jnp.zeros(sample_shape, F32))
        return state

    def with_buffers(self, state: LMSState, sample: jax.Array) -> LMSState:
        if state.derivatives is not None:
            return state
        return state.replace(derivatives=jnp.zeros((state.coeffs.shape[1],) + sample.shape, F32))

    def scale_model_input(self, state: LMSState, sample: jax.Array, i) -> jax.Array:
        """x / sqrt(sigma_i^2 + 1)."""
        return scale_by_sigma(sample, state.sigmas[jnp.asarray(i, jnp.int32)])

    def step(self, state: LMSState, model_output: jax.Array, i, sample: jax.Array, noise=None):
        """One LMS step at index i: x + sum_j coeffs[i, j] d_{newest - j}, d = (x - x0) / sigma.
        model_output, sample: [B, ...]. Returns (prev_sample, state)."""
        i = jnp.asarray(i, jnp.int32)   # an array index: one compiled gather, not one per step
        state = self.with_buffers(state, sample)
        dtype = sample.dtype
        x = sample.astype(F32)
        mo = model_output.astype(F32)
        sigma = state.sigmas[i]
        x0 = ve_predict_x0(self.prediction_type, x, mo, sigma)
        d = (x - x0) / sigma
        ders = jnp.concatenate([d[None], state.derivatives[:-1]])   # newest first
        coeffs = state.coeffs[i]
        acc = coeffs[0] * ders[0]
        for j in range(1, ders.shape[0]):
            acc = acc + coeffs[j] * ders[j]
        prev = x + acc
        return prev.astype(dtype), state.replace(derivatives=ders)

    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps, state=None):
        """x0 + sigma noise; see sigma_base.ve_add_noise for how sigma is found."""
        return ve_add_noise(state, self.train_sigmas, original_samples, noise, timesteps)
