"""What every jaxgen scheduler shares: config handling, the alpha/sigma tables, small math.

A scheduler object is an immutable, hashable description (a frozen dataclass whose fields are
diffusers' config fields with diffusers' defaults) plus constant tables computed from it. All the
mutable parts of sampling live in a *state* pytree that ``set_timesteps`` returns and ``step``
threads through, so ``scale_model_input`` and ``step`` are pure functions of
``(state, arrays, index)`` and run under ``jax.jit`` / ``jax.lax.scan``:

    s = jaxgen.scheduler_from_config(cfg)
    state = s.set_timesteps(num_inference_steps)            # host: builds the timestep ladder
    x = noise * state.init_noise_sigma
    for i in range(len(state.timesteps)):                   # or jax.lax.scan, i traced
        x_in = s.scale_model_input(state, x, i)
        x, state = s.step(state, model(x_in, state.timesteps[i]), i, x, noise=step_noise)

``i`` is the index into ``state.timesteps`` (not the timestep). Multistep schedulers keep past
model outputs in the state; these buffers take the sample's shape, so under ``lax.scan`` the state
must be created with them: ``set_timesteps(n, sample_shape=x.shape)`` or
``s.with_buffers(state, x)`` (``jaxgen.diffusion.sampling`` does it). Outside a scan a state
without buffers is fine: the first ``step`` allocates them.

Arithmetic: scheduler math runs in float32 whatever the sample dtype (as diffusers' Euler-type
schedulers do); ``step`` returns the sample in the dtype it was given.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.config import filter_config, module_fields, to_json_value, write_json
from jaxgen.convert.pretrained import DIFFUSERS_VERSION   # written into the configs we save
from jaxgen.diffusion import schedules as sch
from jaxgen.errors import ConfigError, DataError

F32 = jnp.float32
SCHEDULER_CONFIG_NAME = "scheduler_config.json"


class Scheduler:
    """Base class. Subclasses are ``@dataclasses.dataclass(frozen=True, kw_only=True)`` whose
    fields are the diffusers config fields of the class of the same name."""

    supported: ClassVar[Mapping[str, tuple]] = {}   # field -> implemented values
    stochastic: ClassVar[bool] = False              # True: step needs noise= (see needs_noise)
    order: ClassVar[int] = 1                        # diffusers' ``order`` (model calls per step)

    # -- construction -----------------------------------------------------------------------
    def __post_init__(self):
        for name in module_fields(type(self)):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._canonicalise()
        self._check_common_fields()
        for name, allowed in self.supported.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{type(self).__name__}: {name}={value!r} is not implemented by "
                                  f"jaxgen (implemented: {', '.join(map(repr, allowed))}).")
        self._validate()
        self._setup()

    def _check_common_fields(self) -> None:
        """ConfigError naming the field for values no schedule can use: num_train_timesteps below
        1 or not an int; beta_start / beta_end not finite, negative, or not below 1."""
        T = getattr(self, "num_train_timesteps", 1)
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
            raise ConfigError(f"{type(self).__name__}: num_train_timesteps={T!r} must be an int >= 1.")
        for name in ("beta_start", "beta_end"):
            if not hasattr(self, name):
                continue
            value = getattr(self, name)
            try:
                ok = 0.0 <= float(value) < 1.0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"{type(self).__name__}: {name}={value!r} must be a number in [0, 1).")

    def _canonicalise(self) -> None:
        """Rewrite legacy field values the way diffusers does at construction (optional)."""

    def _validate(self) -> None:
        """Cross-field checks (optional); raise ConfigError naming the field."""

    def _setup(self) -> None:
        """Compute constant tables from the config (subclasses)."""

    def _set(self, **values) -> None:
        for k, v in values.items():
            object.__setattr__(self, k, v)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | str | os.PathLike) -> "Scheduler":
        """This algorithm from a diffusers scheduler config dict or file, whatever its _class_name
        (diffusers' ``Cls.from_config``): ``scheduler_from_config(cfg, class_name=cls.__name__)``."""
        from jaxgen.diffusion.schedulers import scheduler_from_config  # the registry imports us

        return scheduler_from_config(cfg, class_name=cls.__name__)

    @classmethod
    def _from_fields(cls, cfg: Mapping[str, Any]) -> "Scheduler":
        """Build from the config's own fields (tolerant reading, jaxgen.convert.config)."""
        return cls(**filter_config(cfg, module_fields(cls), owner=cls.__name__))

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config fields (diffusers' names and meaning)."""
        return {k: getattr(self, k) for k in module_fields(type(self))}

    def to_config(self) -> dict[str, Any]:
        """The scheduler_config.json dict diffusers' class of the same name reads back."""
        return to_json_value({"_class_name": type(self).__name__,
                              "_diffusers_version": DIFFUSERS_VERSION, **self.config})

    def save_config(self, folder: str | os.PathLike) -> str:
        """Write ``folder/scheduler_config.json``; returns its path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(os.fspath(folder), SCHEDULER_CONFIG_NAME)
        write_json(path, self.to_config())
        return path

    def replace(self, **changes) -> "Scheduler":
        """A copy with some config fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    # -- interface --------------------------------------------------------------------------
    def needs_noise(self, **step_kwargs) -> bool:
        """Whether ``step`` with these keyword arguments draws on ``noise=``."""
        return self.stochastic

    def with_buffers(self, state, sample: jax.Array):
        """The state with its sample-shaped buffers allocated (no-op for one-step schedulers)."""
        return state

    def scale_model_input(self, state, sample: jax.Array, i) -> jax.Array:
        """The model's input at step ``i``: the sample itself unless the scheduler rescales it."""
        return sample

    def __len__(self) -> int:
        return int(getattr(self, "num_train_timesteps"))


# -- shared helpers ---------------------------------------------------------------------------
def alphas_cumprod_table(cfg: Scheduler, *, zero_snr_floor: bool = False) -> np.ndarray:
    """[T] float32 alpha_bar from the config's beta fields (and rescale_betas_zero_snr if it has it).

    zero_snr_floor: set alpha_bar[T-1] = 2**-24 after a zero-terminal-SNR rescale, as diffusers'
    sigma-based schedulers do so that sigma stays finite.
    """
    betas = sch.make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end,
                           cfg.trained_betas)
    rescale = bool(getattr(cfg, "rescale_betas_zero_snr", False))
    if rescale:
        betas = sch.rescale_zero_terminal_snr(betas)
    ac = sch.make_alphas_cumprod(betas)
    if rescale and zero_snr_floor:
        ac = ac.copy()
        ac[-1] = np.float32(2.0**-24)
    return ac


def check_num_steps(owner: str, n, num_train_timesteps: int) -> int:
    """num_inference_steps must be a positive Python int no larger than T."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ConfigError(f"{owner}.set_timesteps: num_inference_steps must be a Python int, got "
                          f"{type(n).__name__} (it fixes array lengths, so it cannot be traced).")
    n = int(n)
    if n < 1:
        raise ConfigError(f"{owner}.set_timesteps: num_inference_steps={n}; it must be >= 1.")
    if n > num_train_timesteps:
        raise ConfigError(f"{owner}.set_timesteps: num_inference_steps={n} is larger than "
                          f"num_train_timesteps={num_train_timesteps}; use at most that many steps.")
    return n


def check_zero_snr_epsilon(owner: str, cfg, alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> None:
    """Epsilon prediction cannot give x0 at a timestep whose alpha_bar is 0 (zero terminal SNR):
    x0 = (x - eps) / 0 = +-inf. With clip_sample or thresholding diffusers clips that to the range
    (a finite, if uninformative, x0) and jaxgen does the same; without either diffusers' samples
    become inf / NaN, and jaxgen refuses the schedule instead."""
    if (cfg.prediction_type == "epsilon" and not (cfg.clip_sample or cfg.thresholding)
            and np.any(alphas_cumprod[np.asarray(timesteps)] == 0)):
        raise ConfigError(f"{owner}: prediction_type='epsilon' with rescale_betas_zero_snr=True reaches "
                          "a timestep with alpha_bar = 0, where x0 = (x - eps) / 0 is undefined. Use "
                          "prediction_type='v_prediction' (what zero-terminal-SNR models are trained "
                          "with), or timestep_spacing='leading', which never visits t = T-1, or "
                          "clip_sample=True (x0 is then clipped, as diffusers does).")


def require_noise(noise, sample: jax.Array, owner: str, why: str) -> jax.Array:
    """The step's Gaussian noise as float32, or a ValueError saying how to pass it."""
    if noise is None:
        raise DataError(f"{owner}.step {why}, so it needs noise=: pass a standard normal array of "
                         f"the sample's shape {tuple(sample.shape)}, e.g. "
                         "jax.random.normal(jax.random.fold_in(key, i), x.shape).")
    noise = jnp.asarray(noise, F32)
    if noise.shape != sample.shape:
        raise DataError(f"{owner}.step: noise has shape {tuple(noise.shape)}, the sample "
                         f"{tuple(sample.shape)}; they must match.")
    return noise


def threshold_sample(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding (Saharia et al. 2022): per example, s = clip(quantile(|x0|, ratio), 1,
    max_value); x0 -> clip(x0, -s, s) / s. x0: [B, ...] float32."""
    b = x0.shape[0]
    flat = x0.reshape(b, -1)                                    # [B, N]
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)              # [B], linear interpolation
    s = jnp.minimum(jnp.maximum(s, 1.0), max_value)[:, None]    # [B, 1]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def sigma_alpha(sigma: jax.Array):
    """VE noise level -> VP coefficients: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t."""
    alpha_t = 1.0 / jnp.sqrt(sigma * sigma + 1.0)
    return alpha_t, sigma * alpha_t


def vp_predict_x0(prediction_type: str, sample: jax.Array, model_output: jax.Array,
                  alpha_t: jax.Array, sigma_t: jax.Array) -> jax.Array:
    """The x0 a model output means in the VP form x = alpha_t x0 + sigma_t eps (DDPM, DDIM:
    alpha_t = sqrt(alpha_bar), sigma_t = sqrt(1 - alpha_bar); DPM-Solver, UniPC: ``sigma_alpha``):

    epsilon:       (x - sigma_t out) / alpha_t
    sample:        out
    v_prediction:  alpha_t x - sigma_t out

    sample (x), model_output (out): [B, ...] float32; alpha_t, sigma_t: [] float32 (or
    broadcastable to them). Returns [B, ...] float32. Any other prediction_type is a ConfigError.
    The VE form of the k-diffusion-style schedulers is ``sigma_base.ve_predict_x0``.
    """
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    raise ConfigError(f"prediction_type={prediction_type!r} is not implemented; choose one of "
                      "epsilon, sample, v_prediction.")


def vp_predict_eps(prediction_type: str, sample: jax.Array, model_output: jax.Array,
                   alpha_t: jax.Array, sigma_t: jax.Array) -> jax.Array:
    """The noise eps a model output means in the VP form (as ``vp_predict_x0``):

    epsilon:       out
    sample:        (x - alpha_t out) / sigma_t
    v_prediction:  alpha_t out + sigma_t x

    Shapes and dtype as ``vp_predict_x0``; any other prediction_type is a ConfigError.
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    raise ConfigError(f"prediction_type={prediction_type!r} is not implemented; choose one of "
                      "epsilon, sample, v_prediction.")


def index_for_timestep(schedule_timesteps: jax.Array, t, *, missing_is_last: bool) -> jax.Array:
    """Index of timestep value t in the schedule, the way diffusers finds it: the first match, or
    the second if t occurs more than once. No match: the last index if ``missing_is_last``, else -1.
    t: scalar or [B] -> int32 of t's shape."""
    t = jnp.asarray(t)
    match = schedule_timesteps[None, :] == t.reshape(-1, 1).astype(schedule_timesteps.dtype)  # [B, N]
    count = jnp.sum(match, axis=1)
    rank = jnp.cumsum(match, axis=1)
    first = jnp.argmax(rank == 1, axis=1)
    second = jnp.argmax(rank == 2, axis=1)
    none = jnp.asarray(schedule_timesteps.shape[0] - 1 if missing_is_last else -1)
    idx = jnp.where(count > 1, second, jnp.where(count == 1, first, none)).astype(jnp.int32)
    return idx.reshape(t.shape)


def bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] against ``like``; scalars unchanged."""
    v = jnp.asarray(v)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))
