"""Stage bookkeeping of a run: which config, checkpoint folder and parameters each stage has.

A run trains one stage ("main") or several in order (``Task.stages``, e.g. ("vae", "text",
"unet")). The trainer (which trains them) and ``load_run`` (which restores them) both need these
few rules, so they live here and neither imports the other.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from jaxgen.errors import ConfigError
from jaxgen.training.state import TrainState, create_state

def ema_decay_of(config) -> float | None:
    """config.ema.decay when the run keeps an EMA (decay > 0), else None."""
    ema = config.get("ema", None)
    return float(ema.decay) if ema is not None and ema.decay > 0 else None


MAIN_STAGE = "main"
STAGE_FIELDS = ("batch_size", "total_steps", "checkpoint_every", "log_every", "image_every", "optim",
                "ema", "compute_dtype", "nan_policy", "seed", "init_from")


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The config one stage trains with: the top-level fields overlaid by ``config.stages[stage]``.

    Single-stage configs (no ``stages`` field) are returned as they are. Stage entries may set
    STAGE_FIELDS (optim, ema and init_from are merged field by field) and any task-specific fields.
    """
    if "stages" not in config or stage == MAIN_STAGE:
        return config
    if stage not in config.stages:
        raise ConfigError(f"config.stages has no entry {stage!r}; it has {', '.join(config.stages)}.")
    merged = ml_collections.ConfigDict(config.to_dict())
    merged.unlock()
    del merged["stages"]
    for key, value in config.stages[stage].items():
        if key in ("optim", "ema", "init_from") and isinstance(value, ml_collections.ConfigDict):
            if key == "init_from" and key not in merged:   # a config built without the top-level field
                from jaxgen.training.init_from import default_config

                merged[key] = default_config()
            for k, v in value.items():
                merged[key][k] = tuple(v) if isinstance(v, list) else v
        else:
            merged[key] = value
    merged.stage = stage
    merged.lock()
    return merged


def new_train_state(task, tx, use_ema: bool, key: jax.Array, loss_scale: bool = False) -> TrainState:
    """Step-0 state of ``task`` (call under jax.eval_shape for shapes only), with the task's model
    state (None when it has none) and, with ``loss_scale`` (float16 compute), a dynamic loss scale."""
    params, model_state = task.init_variables(key, task.example_batch())
    return create_state(params, tx, use_ema, model_state, loss_scale)


def uses_loss_scale(config) -> bool:
    """Whether a (stage) config computes in float16, which trains with a dynamic loss scale."""
    return config.get("compute_dtype", "float32") == "float16"


def checkpoint_dir(workdir: str, stage: str) -> str:
    """DIR/checkpoints for single-stage runs, DIR/checkpoints/STAGE for each stage of the others."""
    base = os.path.join(workdir, "checkpoints")
    return base if stage == MAIN_STAGE else os.path.join(base, stage)


def final_params(state: TrainState):
    """The parameters a stage hands on: its EMA when it keeps one."""
    return state.ema_params if state.ema_params is not None else state.params


def handed_on(task, state: TrainState):
    """What a stage gives its previews, later stages and the Run's abilities: its final parameters
    joined with its model state by ``task.bind_state`` (the parameters alone for most tasks)."""
    return task.bind_state(final_params(state), state.model_state)
