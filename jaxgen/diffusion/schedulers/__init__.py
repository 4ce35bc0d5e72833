"""Noise schedulers as pure array transforms, one algorithm per file, keyed by diffusers' class name.

    s = jaxgen.scheduler_from_config(cfg)        # a diffusers scheduler_config.json dict
    state = s.set_timesteps(num_inference_steps)
    x = noise * state.init_noise_sigma
    x_in = s.scale_model_input(state, x, i)      # i: index into state.timesteps (may be traced)
    x, state = s.step(state, model_output, i, x, noise=None)
    xt = s.add_noise(x0, noise, t)               # t: training timesteps

See jaxgen.diffusion.schedulers.base for the state / buffer conventions and docs/SCHEDULERS.md
for the list of fields, defaults and the few deliberate differences from diffusers.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from jaxgen.convert.config import module_fields, read_json
from jaxgen.diffusion.schedulers.base import SCHEDULER_CONFIG_NAME, Scheduler
from jaxgen.diffusion.schedulers.ddim import DDIMScheduler, DDIMState
from jaxgen.diffusion.schedulers.ddpm import DDPMScheduler, DDPMState
from jaxgen.diffusion.schedulers.dpm_solver import DPMSolverMultistepScheduler, MultistepState
from jaxgen.diffusion.schedulers.euler import EulerDiscreteScheduler, EulerState
from jaxgen.diffusion.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from jaxgen.diffusion.schedulers.heun import HeunDiscreteScheduler, HeunState
from jaxgen.diffusion.schedulers.lms import LMSDiscreteScheduler, LMSState
from jaxgen.diffusion.schedulers.pndm import PNDMScheduler, PNDMState
from jaxgen.diffusion.schedulers.unipc import UniPCMultistepScheduler, UniPCState
from jaxgen.errors import ConfigError

# diffusers class name -> jaxgen class. Plain data: add a line per new algorithm.
SCHEDULERS: dict[str, type[Scheduler]] = {
    "DDPMScheduler": DDPMScheduler,
    "DDIMScheduler": DDIMScheduler,
    "PNDMScheduler": PNDMScheduler,
    "LMSDiscreteScheduler": LMSDiscreteScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "HeunDiscreteScheduler": HeunDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
}


def scheduler_from_config(cfg: Mapping[str, Any] | str | os.PathLike,
                          class_name: str | None = None) -> Scheduler:
    """A jaxgen scheduler from a diffusers scheduler config.

    cfg: the scheduler_config.json dict as diffusers writes it, or a path to that file or to the
         folder holding it (a pipeline's ``scheduler/`` folder).
    class_name: build this algorithm instead of cfg["_class_name"] (diffusers'
         ``OtherScheduler.from_config(pipe.scheduler.config)``).
    Reading is tolerant the way diffusers' from_config is: keys starting with "_" are metadata;
    fields listed in "_use_default_values" were defaults when written and take the target class's
    own defaults; fields of the other diffusers schedulers implemented here are dropped silently
    (they belong to a compatible class); any other unknown field is ignored with a warning; a known
    field set to a value jaxgen does not implement is a ConfigError naming it.
    """
    if isinstance(cfg, (str, os.PathLike)):
        path = os.fspath(cfg)
        if os.path.isdir(path):
            path = os.path.join(path, SCHEDULER_CONFIG_NAME)
        cfg = read_json(path)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"scheduler_from_config takes a dict or a path, got {type(cfg).__name__}.")
    source = cfg.get("_class_name")
    name = class_name or source
    if name is None:
        raise ConfigError("scheduler config has no '_class_name': say which scheduler to build, "
                          "e.g. scheduler_from_config(cfg, class_name='DDIMScheduler').")
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler {name!r} is not implemented by jaxgen (implemented: "
                          f"{', '.join(sorted(SCHEDULERS))}).")
    cls = SCHEDULERS[name]
    defaults = set(cfg.get("_use_default_values") or ())
    own = set(module_fields(cls))
    others = set()
    for other in SCHEDULERS.values():
        others |= set(module_fields(other))
    kept = {}
    for key, value in cfg.items():
        if key in defaults:
            continue  # written as a default: the target class's default applies
        if not key.startswith("_") and key not in own and key in others:
            continue  # a compatible scheduler's field
        kept[key] = value
    return cls._from_fields(kept)


__all__ = ["SCHEDULERS", "Scheduler", "scheduler_from_config", *sorted(SCHEDULERS),
           "DDIMState", "DDPMState", "EulerState", "HeunState", "LMSState", "MultistepState",
           "PNDMState", "UniPCState"]
