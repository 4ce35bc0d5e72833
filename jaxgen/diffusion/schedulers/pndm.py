"""PNDMScheduler: pseudo numerical methods (Liu et al. 2022), PRK warm-up then PLMS, diffusers' fields."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion import schedules as sch
from jaxgen.diffusion.schedulers.base import (
    F32, Scheduler, alphas_cumprod_table, bcast, check_num_steps, vp_predict_eps)
from jaxgen.errors import ConfigError

PNDM_ORDER = 4


@flax.struct.dataclass
class PNDMState:
    """timesteps: [N] int32 (N = n + 1 without PRK warm-up, n + 9 with it: loop over all of them).

    ets: [4, ...] float32, the last model outputs (newest last), n_ets of them valid;
    cur_model_output / cur_sample: [...] float32, the Runge-Kutta accumulators; counter: steps
    taken. Buffers are None until allocated (see Scheduler.with_buffers).
    """
    timesteps: jax.Array
    init_noise_sigma: jax.Array
    counter: jax.Array                     # [] int32
    n_ets: jax.Array                       # [] int32
    ets: jax.Array | None
    cur_model_output: jax.Array | None
    cur_sample: jax.Array | None
    num_inference_steps: int = flax.struct.field(pytree_node=False)
    num_prk_steps: int = flax.struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PNDMScheduler(Scheduler):
    """Fourth-order linear multistep (PLMS) on the DDIM transfer, started with 12 Runge-Kutta
    (PRK) sub-steps unless ``skip_prk_steps``. Fields and defaults are diffusers' PNDMScheduler."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    supported: ClassVar = {
        "beta_schedule": sch.BETA_SCHEDULES,
        "prediction_type": ("epsilon", "v_prediction"),
        "timestep_spacing": sch.SPACINGS,
    }

    def _setup(self):
        ac = alphas_cumprod_table(self)
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        self._set(alphas_cumprod_np=ac, alphas_cumprod=jnp.asarray(ac),
                  final_alpha_cumprod=jnp.asarray(final, F32))

    def set_timesteps(self, num_inference_steps: int, *, sample_shape=None) -> PNDMState:
        """Host: the state for n steps; state.timesteps int32, n + 1 entries with
        skip_prk_steps, n + 9 with the PRK warm-up. sample_shape: allocate the buffers now."""
        T = self.num_train_timesteps
        n = check_num_steps("PNDMScheduler", num_inference_steps, T)
        # ascending base ladder, as diffusers builds it before the PRK / PLMS split
        if self.timestep_spacing == "linspace":
            base = np.linspace(0, T - 1, n).round().astype(np.int64)
        elif self.timestep_spacing == "leading":
            base = (np.arange(0, n) * (T // n)).round().astype(np.int64) + self.steps_offset
        else:
            base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
        if self.skip_prk_steps:
            prk = np.zeros((0,), np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            if n < 4:
                raise ConfigError(f"PNDMScheduler with PRK steps needs num_inference_steps >= 4, got {n}; "
                                 "use more steps or skip_prk_steps=True.")
            half = T // n // 2
            # the 4 largest timesteps, each followed by its half-step point; then each sub-step
            # point is visited twice except the very first and last ones
            pairs = np.repeat(base[-PNDM_ORDER:], 2) + np.tile(np.array([0, half]), PNDM_ORDER)
            prk = np.repeat(pairs[:-1], 2)[1:-1][::-1]
            plms = base[:-3][::-1]
        ts = np.concatenate([prk, plms]).astype(np.int64)
        if ts.max() > T - 1:
            raise ConfigError(f"PNDMScheduler: the timestep ladder reaches {ts.max()} > {T - 1} "
                              f"(steps_offset={self.steps_offset}); use fewer steps or a smaller offset.")
        state = PNDMState(timesteps=jnp.asarray(ts, jnp.int32), init_noise_sigma=jnp.asarray(1.0, F32),
                          counter=jnp.asarray(0, jnp.int32), n_ets=jnp.asarray(0, jnp.int32),
                          ets=None, cur_model_output=None, cur_sample=None,
                          num_inference_steps=n, num_prk_steps=int(prk.size))
        if sample_shape is not None:
            state = self.with_buffers(state, jnp.zeros(sample_shape, F32))
        return state

    def with_buffers(self, state: PNDMState, sample: jax.Array) -> PNDMState:
        if state.ets is not None:
            return state
        z = jnp.zeros(sample.shape, F32)
        return state.replace(ets=jnp.zeros((PNDM_ORDER,) + sample.shape, F32), cur_model_output=z,
                             cur_sample=z)

    def _prev_sample(self, sample, t, prev_t, mo):
        """The DDIM-like transfer x_t -> x_{prev_t} of the pseudo numerical method (eq. 11)."""
        ac = self.alphas_cumprod
        a_t = ac[t]
        a_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], self.final_alpha_cumprod)
        b_t = 1.0 - a_t
        b_prev = 1.0 - a_prev
        mo = vp_predict_eps(self.prediction_type, sample, mo, jnp.sqrt(a_t), jnp.sqrt(b_t))
        coef = jnp.sqrt(a_prev / a_t)
        denom = a_t * jnp.sqrt(b_prev) + jnp.sqrt(a_t * b_t * a_prev)
        return coef * sample - (a_prev - a_t) * mo / denom

    def step(self, state: PNDMState, model_output: jax.Array, i, sample: jax.Array, noise=None):
        """One PRK sub-step or PLMS step at index i (which one follows from state.counter).
        model_output, sample: [B, ...]. Returns (prev_sample, state)."""
        i = jnp.asarray(i, jnp.int32)   # an array index: one compiled gather, not one per step
        state = self.with_buffers(state, sample)
        dtype = sample.dtype
        x = sample.astype(F32)
        mo = model_output.astype(F32)
        t = state.timesteps[i]
        c = state.counter
        ratio = self.num_train_timesteps // state.num_inference_steps
        ets, n_ets = state.ets, state.n_ets
        cur_mo, cur_x = state.cur_model_output, state.cur_sample

        def sel(cond, a, b):
            return jnp.where(cond, a, b)

        # --- PRK: four sub-steps per model-output group, counter c < num_prk_steps ----------
        in_prk = c < state.num_prk_steps
        phase = c % 4
        prk_prev_t = t - jnp.where(c % 2 == 1, 0, ratio // 2)
        prk_t = state.timesteps[jnp.minimum((c // 4) * 4, state.timesteps.shape[0] - 1)]
        acc = sel(phase == 0, cur_mo + (1 / 6) * mo, cur_mo + (1 / 3) * mo)
        prk_mo_eff = sel(phase == 3, cur_mo + (1 / 6) * mo, mo)
        prk_cur_mo = sel(phase == 3, jnp.zeros_like(cur_mo), acc)
        prk_cur_x = sel(phase == 0, x, cur_x)
        prk_ets = sel(phase == 0, jnp.concatenate([ets[1:], mo[None]]), ets)
        prk_n = jnp.where(phase == 0, jnp.minimum(n_ets + 1, PNDM_ORDER), n_ets)

        # --- PLMS: Adams-Bashforth on the model outputs -------------------------------------
        second = c == 1           # the second of the two warm-up steps of skip_prk_steps
        pl_ets = sel(second, ets, jnp.concatenate([ets[1:], mo[None]]))
        pl_n = jnp.where(second, n_ets, jnp.minimum(n_ets + 1, PNDM_ORDER))
        pl_prev_t = jnp.where(second, t, t - ratio)
        pl_t = jnp.where(second, t + ratio, t)
        e1, e2, e3, e4 = pl_ets[3], pl_ets[2], pl_ets[1], pl_ets[0]
        first_step = (pl_n == 1) & (c == 0)
        second_step = (pl_n == 1) & (c == 1)
        pl_mo_eff = sel(first_step, mo,
                    sel(second_step, (mo + e1) / 2,
                    sel(pl_n == 2, (3 * e1 - e2) / 2,
                    sel(pl_n == 3, (23 * e1 - 16 * e2 + 5 * e3) / 12,
                        (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4)))))
        pl_base = sel(second_step, cur_x, x)
        pl_cur_x = sel(first_step, x, cur_x)

        base = sel(in_prk, prk_cur_x, pl_base)
        t_eff = jnp.where(in_prk, prk_t, pl_t)
        prev_t = jnp.where(in_prk, prk_prev_t, pl_prev_t)
        mo_eff = sel(in_prk, prk_mo_eff, pl_mo_eff)
        prev = self._prev_sample(base, t_eff, prev_t, mo_eff)
        state = state.replace(
            counter=c + 1,
            ets=sel(in_prk, prk_ets, pl_ets),
            n_ets=jnp.where(in_prk, prk_n, pl_n),
            cur_model_output=sel(in_prk, prk_cur_mo, cur_mo),
            cur_sample=sel(in_prk, prk_cur_x, pl_cur_x))
        return prev.astype(dtype), state

    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps,
                  state=None) -> jax.Array:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; timesteps: [B] or scalar training timesteps.
        ``state`` is accepted for a uniform interface and not needed (alpha_bar depends on t only)."""
        a = bcast(self.alphas_cumprod[jnp.asarray(timesteps)], original_samples)
        return jnp.sqrt(a) * original_samples + jnp.sqrt(1.0 - a) * noise
