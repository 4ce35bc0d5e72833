"""DPMSolverMultistepScheduler: DPM-Solver / DPM-Solver++ (Lu et al. 2022), orders 1-3, ODE and
SDE variants, diffusers' fields."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion import schedules as sch
from jaxgen.diffusion.schedulers.base import (
    F32, Scheduler, alphas_cumprod_table, bcast, check_num_steps, index_for_timestep,
    require_noise, sigma_alpha, threshold_sample, vp_predict_eps, vp_predict_x0)
from jaxgen.errors import ConfigError

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")


@flax.struct.dataclass
class MultistepState:
    """timesteps: [N] int32; sigmas: [N + 1] float32 (VE noise levels; the last is 0 or sigma_min).

    model_outputs: [order, ...] float32, the converted outputs of the last steps, newest last
    (None until allocated); lower_order_nums: how many are valid (capped at the order).
    """
    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    lower_order_nums: jax.Array            # [] int32
    model_outputs: jax.Array | None
    num_inference_steps: int = flax.struct.field(pytree_node=False)


def _lambda(alpha_t, sigma_t):
    """Half log-SNR: log(alpha_t) - log(sigma_t)."""
    return jnp.log(alpha_t) - jnp.log(sigma_t)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMSolverMultistepScheduler(Scheduler):
    """Fields and defaults are diffusers' DPMSolverMultistepScheduler (flow-matching fields aside:
    use_flow_sigmas, flow_prediction and dynamic shifting are not implemented).

    Differences from diffusers, all where diffusers fails: algorithm_type 'dpmsolver' /
    'sde-dpmsolver' accept final_sigmas_type='zero' (diffusers raises): the step to sigma = 0 uses
    the exact limit of the first-order update. solver_order=3 with 'sde-dpmsolver' is refused
    (diffusers has no such update and crashes).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    use_lu_lambdas: bool | None = False
    use_flow_sigmas: bool | None = False
    flow_shift: float | None = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    supported: ClassVar = {
        "beta_schedule": sch.BETA_SCHEDULES,
        "solver_order": (1, 2, 3),
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "algorithm_type": ALGORITHMS,
        "solver_type": ("midpoint", "heun"),
        "use_flow_sigmas": (False, None),
        "use_dynamic_shifting": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "variance_type": (None, "learned", "learned_range"),
        "timestep_spacing": sch.SPACINGS,
        "time_shift_type": ("exponential",),
    }

    def _canonicalise(self):
        # diffusers rewrites these legacy values when it builds the scheduler
        if self.algorithm_type == "deis":
            self._set(algorithm_type="dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            self._set(solver_type="midpoint")

    def _validate(self):
        if sum([bool(self.use_karras_sigmas), bool(self.use_exponential_sigmas),
                bool(self.use_beta_sigmas)]) > 1:
            raise ConfigError("DPMSolverMultistepScheduler: set at most one of use_karras_sigmas, "
                              "use_exponential_sigmas, use_beta_sigmas.")
        if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
            raise ConfigError("DPMSolverMultistepScheduler: algorithm_type='sde-dpmsolver' has no "
                              "third-order update; use solver_order<=2 or 'sde-dpmsolver++'.")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++")

    def needs_noise(self, **_) -> bool:
        return self.stochastic

    def _setup(self):
        ac = alphas_cumprod_table(self, zero_snr_floor=True)
        train = sch.sigmas_from_alphas_cumprod(ac)
        alpha_t = np.sqrt(ac)
        sigma_t = np.sqrt((np.float32(1.0) - ac).astype(np.float32))
        lambda_t = (np.log(alpha_t) - np.log(sigma_t)).astype(np.float32)
        self._set(alphas_cumprod_np=ac, alphas_cumprod=jnp.asarray(ac), train_sigmas_np=train,
                  train_sigmas=jnp.asarray(train), lambda_t_np=lambda_t)

    # -- timesteps --------------------------------------------------------------------------
    def _ladder(self, n: int):
        """(timesteps int64 [N], sigmas float32 [N + 1])."""
        T = self.num_train_timesteps
        clipped = int(np.searchsorted(self.lambda_t_np[::-1], np.float32(self.lambda_min_clipped)))
        last = T - clipped
        ts = sch.spaced_timesteps_multistep(self.timestep_spacing, T, n, self.steps_offset, last)
        train = self.train_sigmas_np
        log_sigmas = np.log(train)
        if self.use_karras_sigmas or self.use_exponential_sigmas or self.use_beta_sigmas:
            kind = ("karras" if self.use_karras_sigmas else
                    "exponential" if self.use_exponential_sigmas else "beta")
            sigmas = sch.convert_sigmas(kind, train[::-1].copy(), n)
            ts = sch.sigma_to_t(sigmas, log_sigmas)
            if kind == "karras" and self.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        elif self.use_lu_lambdas:
            lams = log_sigmas[::-1].copy()
            lo, hi = float(lams[-1]), float(lams[0])
            lams = hi + np.linspace(0.0, 1.0, n) * (lo - hi)
            sigmas = np.exp(lams)
            ts = sch.sigma_to_t(sigmas, log_sigmas)
            if self.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(train)), train)
        if self.final_sigmas_type == "sigma_min":
            last_sigma = np.sqrt((np.float32(1.0) - self.alphas_cumprod_np[0]) / self.alphas_cumprod_np[0])
        else:
            last_sigma = 0.0
        sig32 = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
        return np.asarray(ts).astype(np.int64), sig32

    def set_timesteps(self, num_inference_steps: int, *, sample_shape=None) -> MultistepState:
        """Host: the state for n steps; state.timesteps [n] int32 (rounded Karras / Lu ladders
        may repeat a timestep, as in diffusers), state.sigmas [n + 1] float32.
        sample_shape: allocate the model-output buffer now (needed inside lax.scan)."""
        n = check_num_steps(type(self).__name__, num_inference_steps, self.num_train_timesteps)
        ts, sig32 = self._ladder(n)
        state = MultistepState(timesteps=jnp.asarray(ts, jnp.int32), sigmas=jnp.asarray(sig32),
                               init_noise_sigma=jnp.asarray(1.0, F32),
                               lower_order_nums=jnp.asarray(0, jnp.int32), model_outputs=None,
                               num_inference_steps=int(ts.shape[0]))
        if sample_shape is not None:
            state = self.with_buffers(state, jnp.zeros(sample_shape, F32))
        return state

    def with_buffers(self, state: MultistepState, sample: jax.Array) -> MultistepState:
        if state.model_outputs is not None:
            return state
        return state.replace(model_outputs=jnp.zeros((self.solver_order,) + sample.shape, F32))

    # -- model output conversion ------------------------------------------------------------
    def _convert(self, mo, x, sigma):
        """The model output as the solver's variable: x0 (dpmsolver++) or eps (dpmsolver)."""
        alpha_t, sigma_t = sigma_alpha(sigma)
        if self.prediction_type == "epsilon" and self.variance_type in ("learned", "learned_range"):
            mo = mo[..., : x.shape[-1]]      # the noise half of a (noise, variance) output
        if self.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            x0 = vp_predict_x0(self.prediction_type, x, mo, alpha_t, sigma_t)
            if self.thresholding:
                x0 = threshold_sample(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            return x0
        eps = vp_predict_eps(self.prediction_type, x, mo, alpha_t, sigma_t)
        if self.thresholding:
            x0 = threshold_sample(vp_predict_x0("epsilon", x, eps, alpha_t, sigma_t),
                                  self.dynamic_thresholding_ratio, self.sample_max_value)
            eps = vp_predict_eps("sample", x, x0, alpha_t, sigma_t)
        return eps

    # -- updates ----------------------------------------------------------------------------
    def _first_order(self, m0, x, s_t, s_s0, noise):
        alpha_t, sigma_t = sigma_alpha(s_t)
        alpha_s, sigma_s = sigma_alpha(s_s0)
        h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s, sigma_s)
        a = self.algorithm_type
        if a == "dpmsolver++":
            return sigma_t / sigma_s * x - alpha_t * (jnp.exp(-h) - 1.0) * m0
        if a == "sde-dpmsolver++":
            return (sigma_t / sigma_s * jnp.exp(-h) * x + alpha_t * (1 - jnp.exp(-2.0 * h)) * m0
                    + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * noise)
        # eps-space variants: at sigma_t = 0 (final_sigmas_type='zero', which diffusers refuses
        # for them) use the exact limit sigma_t e^h -> alpha_t sigma_s / alpha_s.
        zero = s_t == 0
        safe_h = jnp.where(zero, 0.0, h)
        if a == "dpmsolver":
            out = alpha_t / alpha_s * x - sigma_t * (jnp.exp(safe_h) - 1.0) * m0
            limit = (x - sigma_s * m0) / alpha_s
            return jnp.where(zero, limit, out)
        out = (alpha_t / alpha_s * x - 2.0 * (sigma_t * (jnp.exp(safe_h) - 1.0)) * m0
               + sigma_t * jnp.sqrt(jnp.exp(2 * safe_h) - 1.0) * noise)
        limit = (x - 2.0 * sigma_s * m0 + sigma_s * noise) / alpha_s
        return jnp.where(zero, limit, out)

    def _second_order(self, ms, x, s_t, s_s0, s_s1, noise):
        alpha_t, sigma_t = sigma_alpha(s_t)
        alpha_s0, sigma_s0 = sigma_alpha(s_s0)
        alpha_s1, sigma_s1 = sigma_alpha(s_s1)
        lam_t, lam_s0, lam_s1 = (_lambda(alpha_t, sigma_t), _lambda(alpha_s0, sigma_s0),
                                 _lambda(alpha_s1, sigma_s1))
        m0, m1 = ms[-1], ms[-2]
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        a, midpoint = self.algorithm_type, self.solver_type == "midpoint"
        if a == "dpmsolver++":
            if midpoint:
                return (sigma_t / sigma_s0 * x - alpha_t * (jnp.exp(-h) - 1.0) * D0
                        - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * D1)
            return (sigma_t / sigma_s0 * x - alpha_t * (jnp.exp(-h) - 1.0) * D0
                    + alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0) * D1)
        if a == "dpmsolver":
            if midpoint:
                return (alpha_t / alpha_s0 * x - sigma_t * (jnp.exp(h) - 1.0) * D0
                        - 0.5 * (sigma_t * (jnp.exp(h) - 1.0)) * D1)
            return (alpha_t / alpha_s0 * x - sigma_t * (jnp.exp(h) - 1.0) * D0
                    - sigma_t * ((jnp.exp(h) - 1.0) / h - 1.0) * D1)
        if a == "sde-dpmsolver++":
            base = (sigma_t / sigma_s0 * jnp.exp(-h) * x + alpha_t * (1 - jnp.exp(-2.0 * h)) * D0)
            if midpoint:
                base = base + 0.5 * (alpha_t * (1 - jnp.exp(-2.0 * h))) * D1
            else:
                base = base + alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * D1
            return base + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * noise
        base = alpha_t / alpha_s0 * x - 2.0 * (sigma_t * (jnp.exp(h) - 1.0)) * D0
        if midpoint:
            base = base - sigma_t * (jnp.exp(h) - 1.0) * D1
        else:
            base = base - 2.0 * (sigma_t * ((jnp.exp(h) - 1.0) / h - 1.0)) * D1
        return base + sigma_t * jnp.sqrt(jnp.exp(2 * h) - 1.0) * noise

    def _third_order(self, ms, x, s_t, s_s0, s_s1, s_s2, noise):
        alpha_t, sigma_t = sigma_alpha(s_t)
        alpha_s0, sigma_s0 = sigma_alpha(s_s0)
        alpha_s1, sigma_s1 = sigma_alpha(s_s1)
        alpha_s2, sigma_s2 = sigma_alpha(s_s2)
        lam_t, lam_s0 = _lambda(alpha_t, sigma_t), _lambda(alpha_s0, sigma_s0)
        lam_s1, lam_s2 = _lambda(alpha_s1, sigma_s1), _lambda(alpha_s2, sigma_s2)
        m0, m1, m2 = ms[-1], ms[-2], ms[-3]
        h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        a = self.algorithm_type
        if a == "dpmsolver++":
            return (sigma_t / sigma_s0 * x - alpha_t * (jnp.exp(-h) - 1.0) * D0
                    + alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0) * D1
                    - alpha_t * ((jnp.exp(-h) - 1.0 + h) / (h * h) - 0.5) * D2)
        if a == "dpmsolver":
            return (alpha_t / alpha_s0 * x - sigma_t * (jnp.exp(h) - 1.0) * D0
                    - sigma_t * ((jnp.exp(h) - 1.0) / h - 1.0) * D1
                    - sigma_t * ((jnp.exp(h) - 1.0 - h) / (h * h) - 0.5) * D2)
        return (sigma_t / sigma_s0 * jnp.exp(-h) * x + alpha_t * (1.0 - jnp.exp(-2.0 * h)) * D0
                + alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * D1
                + alpha_t * ((1.0 - jnp.exp(-2.0 * h) - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5) * D2
                + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * noise)

    def step(self, state: MultistepState, model_output: jax.Array, i, sample: jax.Array, noise=None):
        """One multistep update at index i. model_output: [B, ..., C] (2C for a learned variance);
        sample, noise: [B, ..., C]. Returns (prev_sample, state)."""
        state = self.with_buffers(state, sample)
        dtype = sample.dtype
        x = sample.astype(F32)
        mo = model_output.astype(F32)
        if self.stochastic:
            noise = require_noise(noise, x, type(self).__name__, f"uses {self.algorithm_type}")
        else:
            noise = None
        N = state.num_inference_steps
        i = jnp.asarray(i, jnp.int32)
        sig = state.sigmas
        lower_final = (i == N - 1) & (self.euler_at_final or (self.lower_order_final and N < 15)
                                      or self.final_sigmas_type == "zero")
        lower_second = (i == N - 2) & (self.lower_order_final and N < 15)
        m = self._convert(mo, x, sig[i])
        ms = jnp.concatenate([state.model_outputs[1:], m[None]])     # newest last
        lon = state.lower_order_nums
        s_t, s0 = sig[i + 1], sig[i]
        s1, s2 = sig[jnp.maximum(i - 1, 0)], sig[jnp.maximum(i - 2, 0)]
        prev = self._first_order(m, x, s_t, s0, noise)
        if self.solver_order >= 2:
            use_first = (lon < 1) | lower_final
            p2 = self._second_order(ms, x, s_t, s0, s1, noise)
            if self.solver_order == 3:
                use_second = (lon < 2) | lower_second
                p3 = self._third_order(ms, x, s_t, s0, s1, s2, noise)
                p2 = jnp.where(use_second, p2, p3)
            prev = jnp.where(use_first, prev, p2)
        state = state.replace(model_outputs=ms,
                              lower_order_nums=jnp.minimum(lon + 1, self.solver_order))
        return prev.astype(dtype), state

    # -- forward process --------------------------------------------------------------------
    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps, state=None):
        """alpha x0 + sigma noise at the noise level of timestep t: with a state, the schedule's
        own at the index of t in state.timesteps (diffusers' rule: first match, or the second if
        repeated, or the last index if absent); without one, the training sigma at t."""
        t = jnp.asarray(timesteps)
        if state is None:
            sigma = self.train_sigmas[t]
        else:
            sigma = state.sigmas[index_for_timestep(state.timesteps, t, missing_is_last=True)]
        alpha_t, sigma_t = sigma_alpha(bcast(sigma, original_samples))
        return alpha_t * original_samples + sigma_t * noise
