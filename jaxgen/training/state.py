"""The train state: a pytree, nothing hidden (no keys: each step derives its own)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params/opt_state: pytrees; ema_params: pytree or None;
    nonfinite: int32 [], how many steps were refused for a NaN/Inf loss or gradient."""
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    nonfinite: jax.Array


def create_state(params: Any, tx, use_ema: bool) -> TrainState:
    """A fresh state at step 0 (EMA starts equal to the parameters)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None,
                      nonfinite=jnp.zeros((), jnp.int32))
