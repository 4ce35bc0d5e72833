"""Attention control: a pure function that sees (and may replace) the attention probabilities of
every attention layer of a UNet2DConditionModel, with a state threaded through the layers.

A controller is a static, hashable object (part of a compiled program's key) called as

    probs, state = controller(probs, is_cross, place, block, layer, step, state)

  probs:   float32 [B, heads, queries, keys], softmax(q k^T scale) of one attention layer (the
           batch as the U-Net sees it: with classifier-free guidance [uncond; cond]);
  is_cross: True for cross-attention to the text context (keys = its L tokens), False for
           self-attention (keys = the queries' H*W positions);
  place:   "down", "mid" or "up"; block: the index of the down / up block (0 for the mid block);
  layer:   the transformer layer inside the block: attentions index a * transformer layers per
           attention + transformer_blocks index (a for one layer per attention, SD's layout);
  step:    what the caller passes (the sampling loop's ladder index, int32 [], traced);
  state:   any pytree of arrays, e.g. accumulated attention maps, or constant arrays the
           controller reads (token alignments, schedules).
It returns probabilities of the same shape (float32) and the new state (same structure, shapes
and dtypes). Within one U-Net call the layers run in a fixed order (down blocks, mid, up blocks;
attn1 then attn2 of each transformer layer), so the state is threaded through them in that order.

``apply_controlled(module, variables, *args, controller=, state=, step=, **kwargs)`` runs
``module.apply`` with a controller and returns ``(output, new_state)``: a pure function, so a
sampling loop carries the state through ``lax.scan`` (jaxgen/pipelines/prompt_to_prompt.py).
Inside, the state travels on an ``AttentionTape`` (a Python object that lives only while one
apply is traced) and reaches each Attention layer as an ``AttentionSite`` (tape + place, block,
layer), the ``attention_control=`` keyword of the U-Net, its blocks, Transformer2DModel,
BasicTransformerBlock and Attention. Without it (None, the default) every layer runs the attention
kernel exactly as before: the same program.

With a controller the probabilities are formed explicitly: logits q k^T * scale in float32 (mask
applied), softmax in float32, the controller, then cast to the values' dtype and applied, which
is the "xla" kernel's computation (jaxgen.nn.attention), so an identity controller reproduces
the uncontrolled output (tested bit for bit in float32).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxgen.nn.attention import attend, attention_logits

PLACES = ("down", "mid", "up")


class AttentionController(abc.ABC):
    """Base class of controllers (see the module docstring): static and hashable (a frozen
    dataclass is both), called once per attention layer per U-Net call."""

    @abc.abstractmethod
    def __call__(self, probs: jax.Array, is_cross: bool, place: str, block: int, layer: int,
                 step: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        """(probs float32 [B, heads, queries, keys], new state)."""


@dataclasses.dataclass(frozen=True)
class IdentityController(AttentionController):
    """Changes nothing (the state passes through); for tests and as a template."""

    def __call__(self, probs, is_cross, place, block, layer, step, state):
        return probs, state


@dataclasses.dataclass(eq=False)
class AttentionTape:
    """The controller, the step and the current state while one module apply is traced; each
    attention layer replaces ``state`` with the controller's new state."""

    controller: AttentionController
    step: Any
    state: Any

    def site(self) -> AttentionSite:
        return AttentionSite(self)


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionSite:
    """Where in the U-Net an attention layer sits (place, block, layer), with the tape it writes
    to; passed down as ``attention_control=``; each level fills in its part with ``at``."""

    tape: AttentionTape
    place: str | None = None
    block: int | None = None
    layer: int | None = None

    def at(self, **where) -> AttentionSite:
        """This site with some of place / block / layer set."""
        return dataclasses.replace(self, **where)

    def __call__(self, probs: jax.Array, is_cross: bool) -> jax.Array:
        """Run the controller on one layer's probabilities; the tape keeps the new state."""
        tape = self.tape
        out, tape.state = tape.controller(probs, bool(is_cross), self.place or "down", self.block or 0,
                                          self.layer or 0, tape.step, tape.state)
        if out.shape != probs.shape:
            raise ValueError(f"{type(tape.controller).__name__} returned probabilities of shape {out.shape} "
                             f"for {probs.shape}; a controller keeps the shape.")
        return out


def controlled_attention(q: jax.Array, k: jax.Array, v: jax.Array, site: AttentionSite, *, is_cross: bool,
                         mask: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """softmax(q k^T scale + mask) v with the probabilities passed through ``site``'s controller.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; mask: boolean broadcastable to [B, H, Lq, Lk] (True =
    attend). Logits and softmax in float32 (the "xla" kernel's computation). Returns [B, Lq, H, D]
    in q's dtype.
    """
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = site(jax.nn.softmax(attention_logits(q.astype(jnp.float32), k.astype(jnp.float32), scale, mask),
                                axis=-1), is_cross)
    return attend(probs.astype(v.dtype), v).astype(dtype)


def apply_controlled(module, variables, *args, controller: AttentionController, state: Any = None,
                     step: Any = 0, **kwargs) -> tuple[Any, Any]:
    """``module.apply(variables, *args, attention_control=..., **kwargs)`` with ``controller``
    seeing every attention layer; returns (output, the state after the last layer).

    module: a UNet2DConditionModel (or any module whose __call__ takes attention_control=);
    state: the controller's state pytree before the call; step: passed to every controller call
    (e.g. the ladder index, int32 [], traced). Pure and jittable."""
    tape = AttentionTape(controller, jnp.asarray(step), state)
    out = module.apply(variables, *args, attention_control=tape.site(), **kwargs)
    return out, tape.state
