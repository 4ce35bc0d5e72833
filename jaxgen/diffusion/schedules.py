"""Noise schedules as data: betas, cumulative alphas, sigmas, timestep spacings.

Everything here runs on the host in NumPy, once per scheduler or per ``set_timesteps`` call, and
returns float32 arrays whose values are the ones diffusers computes in PyTorch (float32 betas,
a cumulative product accumulated in float64 and rounded to float32 as ``torch.cumprod`` does on
CPU, float64 ``np.interp`` over float32 tables). ``Schedule`` carries the per-timestep
coefficients into jitted code as a pytree.

Conventions: ``T`` is the number of training timesteps; training timestep ``t`` runs 0..T-1
with ``t = 0`` the least noisy; ``alpha_bar[t] = prod_{s<=t} (1 - beta_s)``; the
variance-exploding noise level is ``sigma[t] = sqrt((1 - alpha_bar[t]) / alpha_bar[t])``.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")
SPACINGS = ("linspace", "leading", "trailing")


# -- betas ------------------------------------------------------------------------------------
def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace with the values ``torch.linspace(start, end, n, dtype=torch.float32)``
    gives on CPU: step = (end - start) / (n - 1) in float32; the first half is start + i step, the
    second half end - (n - 1 - i) step, each a fused multiply-add (one rounding). [n] float32.
    """
    n = int(n)
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    # float64 holds step * i exactly, so one rounding to float32 below is the fused result
    head = np.float64(start32) + np.float64(step) * i
    tail = np.float64(end32) - np.float64(step) * (n - 1 - i)
    return np.where(np.arange(n) < n // 2, head, tail).astype(np.float32)


def _alpha_bar_fn(kind: str):
    """Continuous alpha_bar(u), u in [0, 1], of the discretised schedules (float64 math)."""
    if kind == "cosine":  # Nichol & Dhariwal 2021, s = 0.008
        return lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    if kind == "exp":
        return lambda u: math.exp(-12.0 * u)
    if kind == "laplace":
        def laplace(u):
            lam = -0.5 * math.copysign(1.0, 0.5 - u) * math.log(1.0 - 2.0 * abs(0.5 - u) + 1e-6)
            snr = math.exp(lam)
            return math.sqrt(snr / (1.0 + snr))
        return laplace
    raise ConfigError(f"alpha_bar kind {kind!r} is unknown (use 'cosine', 'exp' or 'laplace').")


def betas_from_alpha_bar(num_train_timesteps: int, kind: str = "cosine",
                         max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous alpha_bar: beta_t = min(1 - a(t+1/T)/a(t/T), max_beta).

    Returns [T] float32.
    """
    fn = _alpha_bar_fn(kind)
    T = num_train_timesteps
    betas = [min(1.0 - fn((t + 1) / T) / fn(t / T), max_beta) for t in range(T)]
    return np.asarray(betas, dtype=np.float64).astype(np.float32)


def make_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000,
               beta_start: float = 0.0001, beta_end: float = 0.02,
               trained_betas: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """The [T] float32 betas of a diffusers ``beta_schedule`` (``trained_betas`` wins if given).

    linear:            linspace(beta_start, beta_end, T)
    scaled_linear:     linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2   (Stable Diffusion)
    squaredcos_cap_v2: the cosine schedule, betas capped at 0.999
    sigmoid:           sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    laplace / exp:     the Laplace / exponential alpha_bar curves, discretised like the cosine one
    """
    T = int(num_train_timesteps)
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64).astype(np.float32)
        if betas.ndim != 1 or betas.shape[0] != T:
            raise ConfigError(f"trained_betas has shape {betas.shape}; it must be [num_train_timesteps]"
                              f" = [{T}]: fix one of the two.")
        return betas
    if beta_schedule == "linear":
        return linspace_f32(beta_start, beta_end, T)
    if beta_schedule == "scaled_linear":
        root = linspace_f32(beta_start**0.5, beta_end**0.5, T)
        return root * root  # squared in float32, as torch does
    if beta_schedule == "squaredcos_cap_v2":
        return betas_from_alpha_bar(T, "cosine")
    if beta_schedule in ("laplace", "exp"):
        return betas_from_alpha_bar(T, beta_schedule)
    if beta_schedule == "sigmoid":
        u = linspace_f32(-6.0, 6.0, T)
        sig = (1.0 / (1.0 + np.exp(-u.astype(np.float64)))).astype(np.float32)
        return (sig * np.float32(beta_end - beta_start) + np.float32(beta_start)).astype(np.float32)
    raise ConfigError(f"beta_schedule={beta_schedule!r} is not implemented by jaxgen "
                      f"(implemented: {', '.join(BETA_SCHEDULES)}; or pass trained_betas).")


def cumprod_f32(values: np.ndarray) -> np.ndarray:
    """Cumulative product of a float32 vector, accumulated in float64 and rounded to float32.

    This is what ``torch.cumprod`` computes for a float32 CPU tensor, bit for bit.
    """
    return np.cumprod(np.asarray(values, np.float32).astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so that alpha_bar[T-1] = 0 and alpha_bar[0] is kept.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.
    betas: [T] float32 -> [T] float32 (the last beta is exactly 1).
    """
    alphas = (np.float32(1.0) - np.asarray(betas, np.float32)).astype(np.float32)
    root = np.sqrt(cumprod_f32(alphas))
    first, last = root[0], root[-1]
    root = root - last
    root = root * (first / (first - last))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]]).astype(np.float32)
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """alpha_bar = cumprod(1 - betas): [T] float32 -> [T] float32."""
    return cumprod_f32((np.float32(1.0) - np.asarray(betas, np.float32)).astype(np.float32))


@flax.struct.dataclass
class Schedule:
    """Per-timestep coefficients of a discrete diffusion process; every field is [T] float32."""
    betas: jax.Array
    alphas: jax.Array             # 1 - beta_t
    alpha_bar: jax.Array          # prod_{s<=t} (1 - beta_s)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_schedule(beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                  beta_start: float = 0.0001, beta_end: float = 0.02,
                  trained_betas: Sequence[float] | np.ndarray | None = None,
                  rescale_betas_zero_snr: bool = False) -> Schedule:
    """A ``Schedule`` from diffusers-style fields (see ``make_betas``); all fields [T] float32."""
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    return Schedule(betas=jnp.asarray(betas), alphas=jnp.asarray(alphas),
                    alpha_bar=jnp.asarray(cumprod_f32(alphas)))


# -- sigmas -----------------------------------------------------------------------------------
def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): [T] float32 -> [T] float32 (ascending in t)."""
    ac = np.asarray(alphas_cumprod, np.float32)
    return np.sqrt(((np.float32(1.0) - ac) / ac).astype(np.float32)).astype(np.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (eq. 5): n sigmas from sigma_max down to sigma_min, float64 [n]."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas evenly spaced in log sigma, sigma_max down to sigma_min, float64 [n]."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6,
                beta: float = 0.6) -> np.ndarray:
    """n sigmas at the quantiles of a Beta(alpha, beta) law ("Beta Sampling is All You Need"),
    sigma_max down to sigma_min, float64 [n]. Needs scipy."""
    from scipy import stats  # scipy comes with scikit-learn, a jaxgen dependency

    q = stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, n), alpha, beta)
    return sigma_min + q * (sigma_max - sigma_min)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of noise levels, by linear interpolation in log sigma.

    sigmas: [n] (any float dtype); log_sigmas: [T] float32 log of the training sigmas (ascending).
    Returns [n] float64, clipped to [0, T-1]. Same dtypes at each step as diffusers' helper, so
    the result is the same to the last bit.
    """
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))                  # [n]
    dists = log_sigma[None, :] - log_sigmas[:, None]               # [T, n]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * high


def convert_sigmas(kind: str, in_sigmas: np.ndarray, n: int, sigma_min: float | None = None,
                   sigma_max: float | None = None) -> np.ndarray:
    """Re-space a descending sigma ladder: kind 'karras' | 'exponential' | 'beta'.

    in_sigmas: descending; its ends are the range unless sigma_min / sigma_max are given.
    Returns [n] float64, descending.
    """
    lo = float(in_sigmas[-1]) if sigma_min is None else float(sigma_min)
    hi = float(in_sigmas[0]) if sigma_max is None else float(sigma_max)
    if kind == "karras":
        return karras_sigmas(lo, hi, n)
    if kind == "exponential":
        return exponential_sigmas(lo, hi, n)
    if kind == "beta":
        return beta_sigmas(lo, hi, n)
    raise ConfigError(f"sigma spacing {kind!r} is unknown (use 'karras', 'exponential' or 'beta').")


# -- timestep spacing -------------------------------------------------------------------------
def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                     steps_offset: int = 0) -> np.ndarray:
    """Descending integer timesteps of the DDPM/DDIM family: [n] int64.

    linspace: round(linspace(0, T-1, n)); leading: arange(n) * (T // n) + steps_offset;
    trailing: round(arange(T, 0, -T/n)) - 1 (starts at T-1).
    """
    T, n = int(num_train_timesteps), int(num_inference_steps)
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + steps_offset
        if ts[0] > T - 1:
            raise ConfigError(f"timestep_spacing='leading' with steps_offset={steps_offset} and "
                              f"{n} steps reaches timestep {ts[0]} > {T - 1}: use fewer steps or "
                              "steps_offset=0.")
        return ts
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    raise ConfigError(f"timestep_spacing={spacing!r} is not implemented (use one of {SPACINGS}).")


def spaced_timesteps_float(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                           steps_offset: int = 0) -> np.ndarray:
    """Descending float32 timesteps of the sigma (k-diffusion) family: [n] float32.

    As ``spaced_timesteps`` except that linspace timesteps are not rounded.
    """
    T, n = int(num_train_timesteps), int(num_inference_steps)
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32)
        return ts + np.float32(steps_offset)
    if spacing == "trailing":
        return np.arange(T, 0, -T / n).round().astype(np.float32) - np.float32(1)
    raise ConfigError(f"timestep_spacing={spacing!r} is not implemented (use one of {SPACINGS}).")


def spaced_timesteps_multistep(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                               steps_offset: int = 0, last_timestep: int | None = None) -> np.ndarray:
    """Descending int64 timesteps of the multistep solvers (DPM-Solver, UniPC): [n].

    linspace and leading space n + 1 points over [0, last_timestep) and drop the smallest;
    trailing starts at last_timestep - 1 with stride T / n.
    """
    T, n = int(num_train_timesteps), int(num_inference_steps)
    last = T if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].copy().astype(np.int64)
        return ts + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
    raise ConfigError(f"timestep_spacing={spacing!r} is not implemented (use one of {SPACINGS}).")
