"""The whole sampling loop as one ``jax.lax.scan``, with classifier-free guidance.

    s = jaxgen.scheduler_from_config(cfg)
    state = s.set_timesteps(50)
    x = sample_loop(s, state, model_fn, noise, key=key, cond=c, uncond=u, guidance_scale=7.5)

``sample_loop`` is pure: wrap it in ``jax.jit`` (with the scheduler, ``model_fn`` and the static
options closed over or marked static) to compile the 50 steps into one program. Pipelines and
``train.sample`` do that; this module knows nothing about devices.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jaxgen.diffusion.schedulers.base import F32, Scheduler

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def guided_output(model_fn: ModelFn, x_in: jax.Array, t: jax.Array, cond: Any, uncond: Any = None,
                  guidance_scale: float | jax.Array = 1.0) -> jax.Array:
    """The model output with classifier-free guidance: uncond + g (cond - uncond).

    model_fn(x_in, t, cond) -> [B, ...]; x_in: [B, ...]; t: [] timestep; cond / uncond: pytrees
    with a leading batch axis B (e.g. text embeddings [B, L, D] or labels [B]). Both passes run as
    one batch of 2B (unconditional first). With a Python guidance_scale <= 1, or no uncond, only
    the conditional pass runs (g = 1 gives exactly the conditional output).
    """
    if uncond is None:
        if not isinstance(guidance_scale, (int, float)) or guidance_scale > 1:
            raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional input: pass "
                             "uncond= (e.g. the empty prompt's embeddings or the null class label).")
        return model_fn(x_in, t, cond)
    if isinstance(guidance_scale, (int, float)) and guidance_scale <= 1:
        return model_fn(x_in, t, cond)
    if cond is None:
        raise ValueError("classifier-free guidance got uncond= but no cond=: pass both.")
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
    out = model_fn(jnp.concatenate([x_in, x_in], axis=0), t, both)       # [2B, ...]
    out_u, out_c = jnp.split(out, 2, axis=0)
    return out_u + guidance_scale * (out_c - out_u)


def _with_index(model_fn, i, x_in, t, cond):
    return model_fn(x_in, t, cond, i)


def step_noise(key: jax.Array, i: jax.Array, like: jax.Array) -> jax.Array:
    """The variance noise of step i: standard normal, float32, shaped like the sample; drawn from
    fold_in(key, i), so it does not depend on where the loop starts."""
    return jax.random.normal(jax.random.fold_in(key, i), like.shape, F32)


def sample_loop(scheduler: Scheduler, state, model_fn: ModelFn, x_init: jax.Array, *,
                key: jax.Array | None = None, cond: Any = None, uncond: Any = None,
                guidance_scale: float | jax.Array = 1.0, start_index: int = 0,
                scale_init: bool = True, return_trajectory: bool = False,
                step_kwargs: Mapping[str, Any] | None = None, pass_index: bool = False):
    """Run the reverse process over state.timesteps[start_index:] under ``lax.scan``.

    scheduler, state: from ``scheduler.set_timesteps(n)`` (any jaxgen scheduler).
    model_fn(x_in, t, cond) -> output [B, ...]: x_in the scaled sample, t the [] timestep
        (state.timesteps[i], int32 or float32), cond as given (None if not).
    x_init: [B, ...] float. scale_init=True: unit Gaussian noise, multiplied by
        state.init_noise_sigma; False: an already noised sample (image-to-image, from
        ``scheduler.add_noise`` at state.timesteps[start_index]).
    key: typed PRNG key for the per-step variance noise of stochastic schedulers (DDPM, DDIM with
        eta > 0, Euler ancestral, SDE DPM-Solver, Euler with churn); step i draws from
        fold_in(key, i). Needed only by those.
    cond, uncond, guidance_scale: classifier-free guidance, see ``guided_output``.
    start_index: Python int; skip the first entries of the ladder (image-to-image strength).
    step_kwargs: extra keyword arguments of ``scheduler.step`` (DDIM's eta, Euler's s_churn, ...).
    pass_index: model_fn takes a fourth argument, the ladder index i (int32 [], traced), e.g. to
        switch a ControlNet on and off by step.
    Returns x_0 [B, ...] in x_init's dtype, or (x_0, trajectory) with trajectory
    [N - start_index, B, ...]: the sample after every step (for denoising strips).
    """
    step_kwargs = dict(step_kwargs or {})
    n = int(state.timesteps.shape[0])
    if not 0 <= start_index < n:
        raise ValueError(f"start_index={start_index} is outside the ladder of {n} entries.")
    needs_noise = scheduler.needs_noise(**step_kwargs)
    if needs_noise and key is None:
        raise ValueError(f"{type(scheduler).__name__} with {step_kwargs or 'these settings'} is "
                         "stochastic: pass key= (a jax.random.key) for its per-step noise.")
    x = x_init * state.init_noise_sigma.astype(x_init.dtype) if scale_init else x_init
    state = scheduler.with_buffers(state, x)

    def body(carry, i):
        x, state = carry
        x_in = scheduler.scale_model_input(state, x, i)
        fn = functools.partial(_with_index, model_fn, i) if pass_index else model_fn
        out = guided_output(fn, x_in, state.timesteps[i], cond, uncond, guidance_scale)
        noise = step_noise(key, i, x) if needs_noise else None
        x, state = scheduler.step(state, out, i, x, noise=noise, **step_kwargs)
        return (x, state), (x if return_trajectory else None)

    (x, _), traj = jax.lax.scan(body, (x, state), jnp.arange(start_index, n, dtype=jnp.int32))
    if return_trajectory:
        return x, traj
    return x
