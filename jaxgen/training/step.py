"""Pure train-step builders. jit and shardings are applied where the step is used (the trainer)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxgen.training.optim import ema_update
from jaxgen.training.state import TrainState

# loss_fn(params, batch, key) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def cast_floating(tree: Any, dtype) -> Any:
    """Cast the floating leaves of ``tree`` to ``dtype`` (integer leaves untouched)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, schedule=None,
                    ema_decay: float | None = None, ema_warmup: bool = True,
                    compute_dtype=jnp.float32) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Build ``step(state, batch, root_key) -> (state, metrics)``.

    The step's key is fold_in(root_key, state.step), so resuming gives identical randomness.
    compute_dtype: the parameters are cast to it for the forward/backward pass (bf16 compute with
    float32 master parameters); gradients and updates stay float32.
    A step whose loss or gradient is not finite changes nothing but ``step`` and ``nonfinite``:
    parameters, optimizer state and EMA keep their last finite values, so nothing poisoned is
    ever saved; the trainer stops or goes on according to its NaN policy.
    """

    def objective(params, batch, key):
        loss, metrics = loss_fn(cast_floating(params, compute_dtype), batch, key)
        return loss.astype(jnp.float32), metrics

    def step(state: TrainState, batch: dict, root_key: jax.Array):
        key = jax.random.fold_in(root_key, state.step)
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch, key)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # refuse the step if the loss, the gradient or the update is not finite
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, state.step, ema_decay, ema_warmup)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + 1,
                               params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state),
                               ema_params=None if ema is None else keep(ema, state.ema_params),
                               nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": grad_norm, **metrics}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return new_state, metrics

    return step
