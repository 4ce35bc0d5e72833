"""The train state: a pytree, nothing hidden (no keys: each step derives its own)."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params/opt_state: pytrees; ema_params: pytree or None;
    nonfinite: int32 [], how many steps were refused for a NaN/Inf loss or gradient;
    model_state: the model's non-parameter Flax collections ({"vq_ema": ..., "batch_stats": ...}),
    updated by the forward pass rather than the optimizer, or None when the task has none (then
    the state has the same leaves, and checkpoints the same layout, as before the field existed).
    loss_scale: float16 compute's dynamic loss scale {"scale": float32 [], "good_steps": int32 []}
    (``jaxgen.training.step``), None otherwise (and then left out of checkpoints, as model_state).
    """
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    nonfinite: jax.Array
    model_state: Any = None
    loss_scale: Any = None


# float16 compute's dynamic loss scaling: start at 2^15, halve on an overflowing gradient (the step
# is skipped), double after this many finite steps in a row (the usual mixed-precision recipe)
INITIAL_LOSS_SCALE = 2.0 ** 15
LOSS_SCALE_PERIOD = 2000


def initial_loss_scale() -> dict:
    return {"scale": jnp.asarray(INITIAL_LOSS_SCALE, jnp.float32), "good_steps": jnp.zeros((), jnp.int32)}


def create_state(params: Any, tx, use_ema: bool, model_state: Any = None, loss_scale: bool = False) -> TrainState:
    """A fresh state at step 0 (EMA starts equal to the parameters); ``loss_scale``: keep float16's
    dynamic loss scale (``initial_loss_scale``)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None,
                      nonfinite=jnp.zeros((), jnp.int32), model_state=model_state,
                      loss_scale=initial_loss_scale() if loss_scale else None)


def to_checkpoint_tree(state: TrainState) -> dict:
    """The fields of ``state`` as a dict for Orbax, ``model_state`` left out when it is None.

    A run without model state thus keeps the checkpoint layout it had before TrainState had a
    model_state field: checkpoints written earlier restore, and new ones load in older code.
    """
    tree = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    for name in OPTIONAL_FIELDS:
        if tree[name] is None:
            del tree[name]
    return tree


OPTIONAL_FIELDS = ("model_state", "loss_scale")   # left out of checkpoints when None


def from_checkpoint_tree(tree: dict) -> TrainState:
    """The TrainState of a restored ``to_checkpoint_tree`` dict (optional fields None when absent)."""
    return TrainState(**{**{name: None for name in OPTIONAL_FIELDS}, **tree})
