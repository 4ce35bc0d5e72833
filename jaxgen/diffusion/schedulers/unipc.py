"""UniPCMultistepScheduler: unified predictor-corrector (Zhao et al. 2023), B(h) variants bh1 and
bh2, diffusers' fields."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion import schedules as sch
from jaxgen.diffusion.schedulers.base import (
    F32, Scheduler, alphas_cumprod_table, bcast, check_num_steps, index_for_timestep, sigma_alpha,
    threshold_sample, vp_predict_eps, vp_predict_x0)
from jaxgen.errors import ConfigError


@flax.struct.dataclass
class UniPCState:
    """timesteps: [N] int32; sigmas: [N + 1] float32.

    model_outputs: [order, ...] float32, converted outputs of the last steps, newest last;
    last_sample: [...] float32, the (corrected) sample the last predictor started from;
    this_order: the last predictor's order (the next corrector uses it); has_last: a previous
    step exists. Buffers are None until allocated (see Scheduler.with_buffers).
    """
    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    lower_order_nums: jax.Array            # [] int32
    this_order: jax.Array                  # [] int32
    has_last: jax.Array                    # [] bool
    model_outputs: jax.Array | None
    last_sample: jax.Array | None
    num_inference_steps: int = flax.struct.field(pytree_node=False)


def _lambda(sigma):
    alpha_t, sigma_t = sigma_alpha(sigma)
    return jnp.log(alpha_t) - jnp.log(sigma_t)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniPCMultistepScheduler(Scheduler):
    """Fields and defaults are diffusers' UniPCMultistepScheduler (flow-matching fields aside:
    use_flow_sigmas, flow_prediction, dynamic shifting and solver_p are not implemented).

    Difference from diffusers, only where diffusers returns NaN / inf: a predictor step that ends
    at sigma = 0 (final_sigmas_type='zero') is first order and uses its exact limit, the data
    prediction x0. diffusers' own arithmetic gives the same x0 for solver_type='bh2',
    predict_x0=True, lower_order_final=True (the defaults) and NaN or inf for bh1,
    predict_x0=False or lower_order_final=False. See docs/SCHEDULERS.md.
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
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple = ()
    solver_p: None = None
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    use_flow_sigmas: bool | None = False
    flow_shift: float | None = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str | None = "zero"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    supported: ClassVar = {
        "beta_schedule": sch.BETA_SCHEDULES,
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "solver_type": ("bh1", "bh2"),
        "solver_p": (None,),
        "use_flow_sigmas": (False, None),
        "use_dynamic_shifting": (False,),
        "shift_terminal": (None,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "timestep_spacing": sch.SPACINGS,
        "time_shift_type": ("exponential",),
    }

    def _canonicalise(self):
        if self.solver_type in ("midpoint", "heun", "logrho"):
            self._set(solver_type="bh2")     # as diffusers does
        self._set(disable_corrector=tuple(int(k) for k in self.disable_corrector))

    def _validate(self):
        if sum([bool(self.use_karras_sigmas), bool(self.use_exponential_sigmas),
                bool(self.use_beta_sigmas)]) > 1:
            raise ConfigError("UniPCMultistepScheduler: set at most one of use_karras_sigmas, "
                              "use_exponential_sigmas, use_beta_sigmas.")
        if int(self.solver_order) < 1:
            raise ConfigError(f"UniPCMultistepScheduler: solver_order={self.solver_order}; use >= 1.")

    def _setup(self):
        ac = alphas_cumprod_table(self, zero_snr_floor=True)
        train = sch.sigmas_from_alphas_cumprod(ac)
        self._set(alphas_cumprod_np=ac, alphas_cumprod=jnp.asarray(ac), train_sigmas_np=train,
                  train_sigmas=jnp.asarray(train))

    # -- timesteps --------------------------------------------------------------------------
    def _ladder(self, n: int):
        T = self.num_train_timesteps
        ts = sch.spaced_timesteps_multistep(self.timestep_spacing, T, n, self.steps_offset)
        train = self.train_sigmas_np
        zero_final = self.final_sigmas_type == "zero"
        if self.use_karras_sigmas or self.use_exponential_sigmas or self.use_beta_sigmas:
            kind = ("karras" if self.use_karras_sigmas else
                    "exponential" if self.use_exponential_sigmas else "beta")
            log_sigmas = np.log(train)
            sigmas = sch.convert_sigmas(kind, train[::-1].copy(), n, self.sigma_min, self.sigma_max)
            ts = sch.sigma_to_t(sigmas, log_sigmas)
            if kind == "karras":
                ts = ts.round()
            last = 0.0 if zero_final else sigmas[-1]
        else:
            sigmas = np.interp(ts, np.arange(0, len(train)), train)
            ac0 = self.alphas_cumprod_np[0]
            last = 0.0 if zero_final else np.sqrt((np.float32(1.0) - ac0) / ac0)
        sig32 = np.concatenate([sigmas, [last]]).astype(np.float32)
        return np.asarray(ts).astype(np.int64), sig32

    def set_timesteps(self, num_inference_steps: int, *, sample_shape=None) -> UniPCState:
        """Host: the state for n steps; state.timesteps [n] int32, state.sigmas [n + 1].
        sample_shape: allocate the model-output buffers now (needed inside lax.scan)."""
        n = check_num_steps("UniPCMultistepScheduler", num_inference_steps, self.num_train_timesteps)
        ts, sig32 = self._ladder(n)
        state = UniPCState(timesteps=jnp.asarray(ts, jnp.int32), sigmas=jnp.asarray(sig32),
                           init_noise_sigma=jnp.asarray(1.0, F32),
                           lower_order_nums=jnp.asarray(0, jnp.int32),
                           this_order=jnp.asarray(1, jnp.int32), has_last=jnp.asarray(False),
                           model_outputs=None, last_sample=None, num_inference_steps=int(ts.shape[0]))
        if sample_shape is not None:
            state = self.with_buffers(state, jnp.zeros(sample_shape, F32))
        return state

    def with_buffers(self, state: UniPCState, sample: jax.Array) -> UniPCState:
        if state.model_outputs is not None:
            return state
        return state.replace(model_outputs=jnp.zeros((self.solver_order,) + sample.shape, F32),
                             last_sample=jnp.zeros(sample.shape, F32))

    # -- pieces -----------------------------------------------------------------------------
    def _convert(self, mo, x, sigma):
        alpha_t, sigma_t = sigma_alpha(sigma)
        if self.predict_x0:
            x0 = vp_predict_x0(self.prediction_type, x, mo, alpha_t, sigma_t)
            if self.thresholding:
                x0 = threshold_sample(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            return x0
        return vp_predict_eps(self.prediction_type, x, mo, alpha_t, sigma_t)

    def _coefficients(self, h, rks, order: int, corrector: bool):
        """B(h), phi_1 and the rho weights of a UniPC update of a given (static) order."""
        hh = -h if self.predict_x0 else h
        h_phi_1 = jnp.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1.0
        factorial = 1
        B_h = hh if self.solver_type == "bh1" else jnp.expm1(hh)
        rks = jnp.stack(rks + [jnp.ones((), F32)])                    # [order]
        R, b = [], []
        for k in range(1, order + 1):
            R.append(rks ** (k - 1))
            b.append(h_phi_k * factorial / B_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        R, b = jnp.stack(R), jnp.stack(b)                              # [order, order], [order]
        if corrector:
            rhos = jnp.full((1,), 0.5, F32) if order == 1 else jnp.linalg.solve(R, b)
        elif order == 1:
            rhos = None
        elif order == 2:
            rhos = jnp.full((1,), 0.5, F32)
        else:
            rhos = jnp.linalg.solve(R[:-1, :-1], b[:-1])
        return B_h, h_phi_1, rhos

    def _weighted(self, rhos, D1s):
        acc = rhos[0] * D1s[0]
        for k in range(1, len(D1s)):
            acc = acc + rhos[k] * D1s[k]
        return acc

    def _predictor(self, sig, ms, x, i, order: int):
        """UniP-p from sig[i] to sig[i + 1] with ms (newest last); static order."""
        s_t, s_s0 = sig[i + 1], sig[i]
        alpha_t, sigma_t = sigma_alpha(s_t)
        alpha_s0, sigma_s0 = sigma_alpha(s_s0)
        lam_s0 = _lambda(s_s0)
        zero = s_t == 0
        h = _lambda(s_t) - lam_s0
        m0 = ms[-1]
        rks, D1s = [], []
        for k in range(1, order):
            lam_k = _lambda(sig[jnp.maximum(i - k, 0)])
            rk = (lam_k - lam_s0) / h
            rks.append(rk)
            D1s.append((ms[-(k + 1)] - m0) / rk)
        if self.predict_x0:
            B_h, h_phi_1, rhos = self._coefficients(h, rks, order, corrector=False)
            x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
            if order > 1:
                x_t = x_t - alpha_t * B_h * self._weighted(rhos, D1s)
            return x_t
        safe_h = jnp.where(zero, 1.0, h) if order == 1 else h
        B_h, h_phi_1, rhos = self._coefficients(safe_h, rks, order, corrector=False)
        x_t = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
        if order > 1:
            return x_t - sigma_t * B_h * self._weighted(rhos, D1s)
        # at sigma_t = 0 the exact limit of the first-order update is the x0 prediction
        return jnp.where(zero, (x - sigma_s0 * m0) / alpha_s0, x_t)

    def _corrector(self, sig, ms, m_t, last_x, i, order: int):
        """UniC: correct the sample at sig[i] (reached from last_x at sig[i - 1]) with the new
        converted output m_t; ms are the outputs before m_t (newest last); static order."""
        s_t, s_s0 = sig[i], sig[jnp.maximum(i - 1, 0)]
        alpha_t, sigma_t = sigma_alpha(s_t)
        alpha_s0, sigma_s0 = sigma_alpha(s_s0)
        lam_s0 = _lambda(s_s0)
        h = _lambda(s_t) - lam_s0
        m0 = ms[-1]
        rks, D1s = [], []
        for k in range(1, order):
            lam_k = _lambda(sig[jnp.maximum(i - (k + 1), 0)])
            rk = (lam_k - lam_s0) / h
            rks.append(rk)
            D1s.append((ms[-(k + 1)] - m0) / rk)
        B_h, h_phi_1, rhos = self._coefficients(h, rks, order, corrector=True)
        D1_t = m_t - m0
        if self.predict_x0:
            x_t = sigma_t / sigma_s0 * last_x - alpha_t * h_phi_1 * m0
            scale = alpha_t * B_h
        else:
            x_t = alpha_t / alpha_s0 * last_x - sigma_t * h_phi_1 * m0
            scale = sigma_t * B_h
        if order > 1:
            res = self._weighted(rhos[:-1], D1s) + rhos[-1] * D1_t
        else:
            res = rhos[-1] * D1_t
        return x_t - scale * res

    def _select(self, order_value, candidates):
        """candidates[k] is the order-(k + 1) result; pick the one of the traced order."""
        out = candidates[0]
        for k in range(1, len(candidates)):
            out = jnp.where(order_value == k + 1, candidates[k], out)
        return out

    def step(self, state: UniPCState, model_output: jax.Array, i, sample: jax.Array, noise=None):
        """Corrector (for the previous step) then predictor at index i.
        model_output, sample: [B, ...]. Returns (prev_sample, state)."""
        state = self.with_buffers(state, sample)
        dtype = sample.dtype
        x = sample.astype(F32)
        mo = model_output.astype(F32)
        i = jnp.asarray(i, jnp.int32)
        N = state.num_inference_steps
        K = self.solver_order
        sig = state.sigmas
        m = self._convert(mo, x, sig[i])
        use_corrector = (i > 0) & state.has_last
        if self.disable_corrector:
            use_corrector = use_corrector & ~jnp.any(
                (i - 1) == jnp.asarray(self.disable_corrector, jnp.int32))
        corrected = self._select(state.this_order, [
            self._corrector(sig, state.model_outputs, m, state.last_sample, i, p)
            for p in range(1, K + 1)])
        x = jnp.where(use_corrector, corrected, x)
        ms = jnp.concatenate([state.model_outputs[1:], m[None]])          # newest last
        this_order = jnp.minimum(K, N - i) if self.lower_order_final else jnp.asarray(K, jnp.int32)
        this_order = jnp.minimum(this_order, state.lower_order_nums + 1)
        # a step that ends at sigma = 0 is first order (jaxgen; see the class docstring)
        this_order = jnp.where(sig[i + 1] == 0, 1, this_order).astype(jnp.int32)
        prev = self._select(this_order, [self._predictor(sig, ms, x, i, p) for p in range(1, K + 1)])
        state = state.replace(model_outputs=ms, last_sample=x, this_order=this_order,
                              has_last=jnp.asarray(True),
                              lower_order_nums=jnp.minimum(state.lower_order_nums + 1, K))
        return prev.astype(dtype), state

    # -- forward process --------------------------------------------------------------------
    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps, state=None):
        """alpha x0 + sigma noise; sigma from the state's ladder (diffusers' lookup of t in
        state.timesteps) or, without a state, the training sigma at t."""
        t = jnp.asarray(timesteps)
        if state is None:
            sigma = self.train_sigmas[t]
        else:
            sigma = state.sigmas[index_for_timestep(state.timesteps, t, missing_is_last=True)]
        alpha_t, sigma_t = sigma_alpha(bcast(sigma, original_samples))
        return alpha_t * original_samples + sigma_t * noise
