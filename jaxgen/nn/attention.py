"""The one attention kernel every jaxgen module calls, with a choice of implementation.

``implementation``:
  "xla"   — einsum + softmax, softmax in float32 (exact reference, any backend);
  "cudnn" — ``jax.nn.dot_product_attention(implementation="cudnn")`` (fused flash attention on
            NVIDIA GPUs; needs float16/bfloat16 and a head size the kernel supports);
  "auto"  — "cudnn" where the backend is GPU and the dtype/shape allow it, else "xla".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def _cudnn_ok(q: jax.Array, mask) -> bool:
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0 and mask is None)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          scale: float | None = None, implementation: str = "xla",
                          upcast: bool = True) -> jax.Array:
    """softmax(q·kᵀ·scale + mask)·v.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; returns [B, Lq, H, D] in q's dtype.
    mask: boolean, broadcastable to [B, H, Lq, Lk]; True = attend. scale defaults to D**-0.5.
    upcast: compute the logits and softmax in float32 (diffusers' upcast_attention/upcast_softmax).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: choose one of {IMPLEMENTATIONS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "auto":
        implementation = "cudnn" if _cudnn_ok(q, mask) else "xla"
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    dtype = q.dtype
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, Lq, Lk]
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).astype(dtype)
