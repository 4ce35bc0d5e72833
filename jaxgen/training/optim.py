"""Optimizers and the EMA of parameters."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def lr_schedule(lr: float, warmup_steps: int, total_steps: int, final_lr_ratio: float = 0.0
                ) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over warmup_steps, then cosine decay to lr*final_lr_ratio."""
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(int(total_steps), warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, decay_steps,
                                              end_value=lr * final_lr_ratio)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warm-up + cosine schedule and global-norm clipping, from a config's ``optim``.

    Fields: lr, warmup_steps, weight_decay, b1, b2, eps, clip_norm (0 = no clipping), final_lr_ratio.
    """
    sched = lr_schedule(optim_cfg.lr, optim_cfg.warmup_steps, total_steps,
                        optim_cfg.get("final_lr_ratio", 0.0))
    parts = []
    if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(optax.adamw(sched, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay))
    return optax.chain(*parts), sched


def ema_decay(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """The EMA decay at update number ``step`` (0-based): min(decay, (1 + n) / (10 + n)) with warm-up."""
    n = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n)) if warmup else jnp.asarray(decay, jnp.float32)


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float, warmup: bool = True) -> Any:
    """ema <- d·ema + (1 − d)·params, with d = ema_decay(step, decay, warmup)."""
    d = ema_decay(step, decay, warmup)
    return jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
