"""Elementwise activations by name: one table for every jaxgen module.

The names mean what the PyTorch libraries mean by them (diffusers' ``get_activation``,
transformers' ``ACT2FN``), so a config.json's ``act_fn`` / ``hidden_act`` picks the same function:

* ``"gelu"`` is the exact (erf) GELU, as ``torch.nn.GELU()``; ``"gelu_new"`` and
  ``"gelu_pytorch_tanh"`` are transformers' tanh approximation. (``jax.nn.gelu`` defaults to the
  tanh form: never call it without ``approximate=``.)
* ``"quick_gelu"`` is CLIP's x sigmoid(1.702 x); ``"silu"`` and ``"swish"`` are the same function.

A module that accepts only part of the table says so with a tuple of names (diffusers' models:
``DIFFUSERS_ACTIVATION_NAMES`` here; CLIP: ``jaxgen.nn.clip.CLIP_ACTIVATION_NAMES``; the plain
autoencoders: ``jaxgen.nn.autoencoder.AUTOENCODER_ACTIVATION_NAMES``) and passes it to
``activation``. Every function maps an array to one of the same shape and dtype.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError

Activation = Callable[[jax.Array], jax.Array]


def exact_gelu(x: jax.Array) -> jax.Array:
    """x Phi(x) with the erf form of Phi: torch.nn.GELU(), transformers' "gelu"."""
    return jax.nn.gelu(x, approximate=False)


def tanh_gelu(x: jax.Array) -> jax.Array:
    """The tanh approximation of GELU: transformers' "gelu_new" / "gelu_pytorch_tanh"."""
    return jax.nn.gelu(x, approximate=True)


def quick_gelu(x: jax.Array) -> jax.Array:
    """x sigmoid(1.702 x): OpenAI CLIP's activation, transformers' "quick_gelu"."""
    return x * jax.nn.sigmoid(1.702 * x)


def mish(x: jax.Array) -> jax.Array:
    """x tanh(softplus(x)): torch.nn.Mish()."""
    return x * jnp.tanh(jax.nn.softplus(x))


ACTIVATIONS: dict[str, Activation] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": mish,
    "gelu": exact_gelu,
    "gelu_new": tanh_gelu,
    "gelu_pytorch_tanh": tanh_gelu,
    "quick_gelu": quick_gelu,
    "tanh": jnp.tanh,
    "elu": jax.nn.elu,
}

# diffusers' get_activation accepts exactly these (its act_fn / resnet_act_fn / non_linearity).
DIFFUSERS_ACTIVATION_NAMES = ("silu", "swish", "mish", "gelu", "relu")


def activation(name: str, choices: Sequence[str] | None = None, *, field: str = "activation",
               owner: str | None = None) -> Activation:
    """The function called ``name`` in ``ACTIVATIONS``.

    choices: the names the caller accepts (None: the whole table). A name outside them is a
    ConfigError that names ``field``, the value and the choices, prefixed by ``owner`` if given.
    """
    allowed = tuple(ACTIVATIONS) if choices is None else tuple(choices)
    if name not in allowed or name not in ACTIVATIONS:
        prefix = f"{owner}: " if owner else ""
        raise ConfigError(f"{prefix}{field}={name!r} is not implemented; choose one of "
                          f"{', '.join(allowed)}.")
    return ACTIVATIONS[name]
