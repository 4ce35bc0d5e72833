"""Pure train-step builders. jit and shardings are applied where the step is used (the trainer)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxgen.training.optim import ema_update
from jaxgen.training.state import LOSS_SCALE_PERIOD, TrainState

# loss_fn(params, batch, key) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
# loss_fn(params, model_state, batch, key) -> (scalar loss, (dict of scalar metrics, new model_state))
StatefulLossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, tuple[dict, Any]]]


def cast_floating(tree: Any, dtype) -> Any:
    """Cast the floating leaves of ``tree`` to ``dtype`` (integer leaves untouched)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _all_finite(tree: Any) -> jax.Array:
    """bool []: every floating leaf of ``tree`` is finite (True for a tree without any)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def next_loss_scale(loss_scale: dict, finite: jax.Array) -> dict:
    """The dynamic loss scale after a step: halved (not below 1) when the gradient was not finite,
    doubled after LOSS_SCALE_PERIOD finite steps in a row."""
    good = jnp.where(finite, loss_scale["good_steps"] + 1, 0)
    grow = good >= LOSS_SCALE_PERIOD
    scale = jnp.where(finite, jnp.where(grow, loss_scale["scale"] * 2.0, loss_scale["scale"]),
                      jnp.maximum(loss_scale["scale"] / 2.0, 1.0))
    return {"scale": scale.astype(jnp.float32), "good_steps": jnp.where(grow, 0, good).astype(jnp.int32)}


def make_train_step(loss_fn: LossFn | StatefulLossFn, tx: optax.GradientTransformation, *, schedule=None,
                    ema_decay: float | None = None, ema_warmup: bool = True,
                    compute_dtype=jnp.float32, stateful: bool = False
                    ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Build ``step(state, batch, root_key) -> (state, metrics)``.

    The step's key is fold_in(root_key, state.step), so resuming gives identical randomness.
    compute_dtype: the parameters are cast to it for the forward/backward pass (bf16 compute with
    float32 master parameters); gradients and updates stay float32. With a state that carries a
    ``loss_scale`` (float16 compute), the loss is multiplied by the scale before differentiation
    and the gradient divided by it, so small float16 gradients do not flush to zero; a step whose
    scaled gradient overflows (loss finite, gradient not) is skipped without counting as
    ``nonfinite`` and halves the scale (not below 1), and LOSS_SCALE_PERIOD finite steps in a row
    double it; the metrics then include ``loss_scale``.
    stateful=False: ``loss_fn(params, batch, key) -> (loss, metrics)`` and state.model_state is
    carried unchanged. stateful=True: ``loss_fn(params, model_state, batch, key) -> (loss,
    (metrics, new_model_state))``; the step differentiates with respect to params only and stores
    new_model_state (e.g. an EMA codebook's statistics, BatchNorm's batch_stats). The model state
    is passed as it is (never cast to compute_dtype).
    A step whose loss, gradient, update or new model state is not finite changes nothing but
    ``step`` and ``nonfinite``: parameters, optimizer state, EMA and model state keep their last
    finite values, so nothing poisoned is ever saved; the trainer stops or goes on according to its
    NaN policy.
    """

    def objective(params, model_state, batch, key, scale):
        params = cast_floating(params, compute_dtype)
        if stateful:
            loss, (metrics, new_model_state) = loss_fn(params, model_state, batch, key)
        else:
            (loss, metrics), new_model_state = loss_fn(params, batch, key), model_state
        loss = loss.astype(jnp.float32)
        return loss * scale, (loss, metrics, new_model_state)

    def step(state: TrainState, batch: dict, root_key: jax.Array):
        key = jax.random.fold_in(root_key, state.step)
        scaling = state.loss_scale is not None
        scale = state.loss_scale["scale"] if scaling else jnp.float32(1.0)
        (_, (loss, metrics, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state.model_state, batch, key, scale)
        if scaling:
            grads = jax.tree_util.tree_map(lambda g: g / scale, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # refuse the step if the loss, the gradient, the update or the new model state is not finite
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
                  & _all_finite(model_state))
        loss_scale, overflow = state.loss_scale, jnp.bool_(False)
        if scaling:                 # a finite loss with a non-finite gradient: the scale overflowed
            overflow = jnp.isfinite(loss) & ~finite
            loss_scale = next_loss_scale(state.loss_scale, finite)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, state.step, ema_decay, ema_warmup)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + 1,
                               params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state),
                               ema_params=None if ema is None else keep(ema, state.ema_params),
                               nonfinite=state.nonfinite + (~finite & ~overflow).astype(jnp.int32),
                               model_state=None if model_state is None else keep(model_state, state.model_state),
                               loss_scale=loss_scale)
        metrics = {"loss": loss, "grad_norm": grad_norm, **metrics}
        if scaling:
            metrics["loss_scale"] = scale
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return new_state, metrics

    return step
