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
    """
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    nonfinite: jax.Array
    model_state: Any = None


def create_state(params: Any, tx, use_ema: bool, model_state: Any = None) -> TrainState:
    """A fresh state at step 0 (EMA starts equal to the parameters)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None,
                      nonfinite=jnp.zeros((), jnp.int32), model_state=model_state)


def to_checkpoint_tree(state: TrainState) -> dict:
    """The fields of ``state`` as a dict for Orbax, ``model_state`` left out when it is None.

    A run without model state thus keeps the checkpoint layout it had before TrainState had a
    model_state field: checkpoints written earlier restore, and new ones load in older code.
    """
    tree = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if tree["model_state"] is None:
        del tree["model_state"]
    return tree


def from_checkpoint_tree(tree: dict) -> TrainState:
    """The TrainState of a restored ``to_checkpoint_tree`` dict (model_state None when absent)."""
    return TrainState(**{"model_state": None, **tree})
