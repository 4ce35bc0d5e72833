"""Shared building blocks of jaxgen's convolutional generative models, exact against diffusers.

Who uses what:

* ``get_timestep_embedding``, ``GaussianFourierProjection``, ``TimestepEmbedding``: the time (and
  class) conditioning of the U-Nets (``jaxgen.nn.unet``).
* ``group_norm``, ``conv2d``: one place that fixes the PyTorch-equal settings (explicit epsilon,
  ``use_fast_variance=False``, explicit padding). Activations come from ``jaxgen.nn.activations``
  (exact erf GELU), limited to diffusers' names (``DIFFUSERS_ACTIVATION_NAMES``).
* ``ResnetBlock2D``: every U-Net block (with a time embedding) and the VAE / VQ encoders and
  decoders (``temb=None``: then it has no ``time_emb_proj``).
* ``Downsample2D`` / ``Upsample2D``: U-Net (``padding=1``) and VAE (``padding=0`` = diffusers'
  asymmetric pad (0, 1, 0, 1) then an unpadded stride-2 conv).
* ``Attention``: diffusers' ``Attention``; spatial self-attention of UNet2DModel's attention blocks
  and of the VAE mid block (``norm_num_groups``, ``residual_connection``), and the self/cross
  attention of the transformer blocks. All attention goes through
  ``jaxgen.nn.attention.dot_product_attention``; ``attention_impl`` picks the kernel.
* ``UNetMidBlock2D``: the middle block of UNet2DModel and of the VAE / VQ models.
* ``FeedForward`` (GEGLU with exact GELU), ``BasicTransformerBlock``, ``Transformer2DModel``: the
  cross-attention blocks of UNet2DConditionModel.

Layout: images are NHWC ``[B, H, W, C]``; token sequences ``[B, L, D]``. Submodules are named
after the PyTorch attributes, so ``jaxgen.convert.tables`` maps their parameters by rule.
Every module takes ``dtype`` (computation dtype, e.g. ``jnp.bfloat16``) and ``param_dtype``
(parameter dtype, float32 by default); norms and softmax reduce in float32 whatever ``dtype`` is.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.nn.activations import DIFFUSERS_ACTIVATION_NAMES, activation, exact_gelu, tanh_gelu
from jaxgen.nn.attention import IMPLEMENTATIONS, dot_product_attention
from jaxgen.nn.attention_control import controlled_attention

Dtype = Any


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def group_norm(num_groups: int, eps: float, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.GroupNorm:
    """torch.nn.GroupNorm(num_groups, C, eps, affine=True) over the last axis of [B, ..., C].

    Statistics over all non-batch axes of each group, two-pass variance (use_fast_variance=False),
    computed in float32; parameters ``scale`` / ``bias`` map to ``weight`` / ``bias``.
    """
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                        param_dtype=param_dtype, name=name)


def layer_norm(eps: float, *, affine: bool = True, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """torch.nn.LayerNorm(D, eps, elementwise_affine=affine) over the last axis (two-pass variance)."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, use_scale=affine, use_bias=affine,
                        dtype=dtype, param_dtype=param_dtype, name=name)


def conv2d(features: int, kernel_size: int = 3, *, stride: int = 1, padding: int = 1,
           use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
           name: str | None = None) -> nn.Conv:
    """torch.nn.Conv2d(in, features, kernel_size, stride, padding) on NHWC input.

    Kernel [kh, kw, in, out] <-> PyTorch weight [out, in, kh, kw] (jaxgen.convert.tables).
    """
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=use_bias, dtype=dtype,
                   param_dtype=param_dtype, name=name)


def upsample_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """F.interpolate(mode="nearest") on NHWC: x2 when output_size is None, else to (H_out, W_out).

    x: [B, H, W, C] -> [B, 2H, 2W, C] (or [B, H_out, W_out, C]). Source index of output row i is
    floor(i * (H / H_out)) with the scale in float32, as PyTorch computes it.
    """
    _, h, w, _ = x.shape
    if output_size is None or tuple(output_size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    h_out, w_out = (int(s) for s in output_size)
    return x[:, index(h, h_out)][:, :, index(w, w_out)]


def _check_impl(impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"attention_impl={impl!r}: choose one of {IMPLEMENTATIONS}.")


# ------------------------------------------------------------------------------------------------
# time embeddings
# ------------------------------------------------------------------------------------------------
def timestep_frequencies(half_dim: int, downscale_freq_shift: float = 1.0,
                         max_period: float = 10000.0) -> np.ndarray:
    """exp(-log(max_period) * k / (half_dim - shift)), k = 0..half_dim-1, as a float32 constant [half_dim].

    The exponent is formed in float32 exactly as diffusers forms it; the exponential is taken in
    float64 and rounded once (torch's float32 exp may differ from it by 1 ulp on a few entries).
    """
    exponent = np.float32(-math.log(max_period)) * np.arange(half_dim, dtype=np.float32)
    exponent = exponent / np.float32(half_dim - downscale_freq_shift)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep embedding (DDPM), diffusers' ``get_timestep_embedding``.

    timesteps: [N], any real dtype (fractional allowed). Returns [N, embedding_dim] float32:
    [sin(t·f), cos(t·f)] (or [cos, sin] with flip_sin_to_cos), zero-padded by one column when
    embedding_dim is odd. f = timestep_frequencies(embedding_dim // 2, downscale_freq_shift, max_period).
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D array [N], got shape {timesteps.shape}.")
    half = embedding_dim // 2
    freqs = jnp.asarray(timestep_frequencies(half, downscale_freq_shift, max_period))
    emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]  # [N, half]
    if scale != 1:
        emb = jnp.float32(scale) * emb
    sin, cos = jnp.sin(emb), jnp.cos(emb)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)  # [N, 2*half]
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the (log) noise level, diffusers' ``GaussianFourierProjection``.

    Parameter ``weight`` [embedding_size] (frozen in diffusers; ordinary here, exclude it from
    the optimizer to keep it fixed). Input x: [N] float; output [N, 2*embedding_size] float32.
    """

    embedding_size: int = 256
    scale: float = 1.0
    log: bool = True
    flip_sin_to_cos: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", lambda k, s: jax.random.normal(k, s, jnp.float32) * self.scale,
                       (self.embedding_size,))
        x = jnp.asarray(x, jnp.float32)
        if self.log:
            x = jnp.log(x)
        proj = x[:, None] * w[None, :].astype(jnp.float32) * jnp.float32(2) * jnp.float32(np.pi)
        parts = [jnp.cos(proj), jnp.sin(proj)] if self.flip_sin_to_cos else [jnp.sin(proj), jnp.cos(proj)]
        return jnp.concatenate(parts, axis=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 (-> post_act), diffusers' ``TimestepEmbedding``.

    x: [B, in] -> [B, out_dim or time_embed_dim]. With ``cond_proj_dim``, ``condition`` [B, cond_proj_dim]
    is projected (``cond_proj``, no bias) and added to x first.
    """

    time_embed_dim: int
    act_fn: str = "silu"
    out_dim: int | None = None
    post_act_fn: str | None = None
    cond_proj_dim: int | None = None
    sample_proj_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        if self.cond_proj_dim is not None:
            cond_proj = nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="cond_proj")
            if condition is not None:
                x = x + cond_proj(condition.astype(self.dtype))
            elif self.is_initializing():  # create the parameters even when init got no condition
                cond_proj(jnp.zeros((x.shape[0], self.cond_proj_dim), self.dtype))
        x = nn.Dense(self.time_embed_dim, use_bias=self.sample_proj_bias, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="linear_1")(x)
        if self.act_fn is not None:
            x = activation(self.act_fn, DIFFUSERS_ACTIVATION_NAMES, field="act_fn")(x)
        x = nn.Dense(self.out_dim or self.time_embed_dim, use_bias=self.sample_proj_bias,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)
        if self.post_act_fn is not None:
            x = activation(self.post_act_fn, DIFFUSERS_ACTIVATION_NAMES, field="post_act_fn")(x)
        return x


# ------------------------------------------------------------------------------------------------
# resolution changes and residual blocks
# ------------------------------------------------------------------------------------------------
class Downsample2D(nn.Module):
    """Halve H and W: 3x3 conv with stride 2, or 2x2 average pooling (``use_conv=False``).

    padding=1: symmetric padding (U-Nets). padding=0: pad one zero row at the bottom and one zero
    column at the right, then an unpadded stride-2 conv (diffusers' VAE). The conv is ``conv``.
    x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_channels or C] (floor for pooling).
    """

    out_channels: int | None = None
    use_conv: bool = False
    padding: int = 1
    kernel_size: int = 3
    bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if not self.use_conv:
            if self.out_channels not in (None, channels):
                raise ConfigError(f"Downsample2D: average pooling keeps the {channels} channels; "
                                  f"out_channels={self.out_channels} needs use_conv=True.")
            return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # torch F.pad(x, (0, 1, 0, 1))
        return conv2d(self.out_channels or channels, self.kernel_size, stride=2, padding=self.padding,
                      use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to ``output_size``), then a 3x3 conv ``conv`` when ``use_conv``.

    x: [B, H, W, C] -> [B, 2H, 2W, out_channels or C].
    """

    out_channels: int | None = None
    use_conv: bool = False
    kernel_size: int = 3
    padding: int = 1
    bias: bool = True
    interpolate: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        channels = x.shape[-1]
        if self.interpolate:
            x = upsample_nearest(x, output_size)
        if self.use_conv:
            x = conv2d(self.out_channels or channels, self.kernel_size, padding=self.padding,
                       use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        return x


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D``: norm1, act, conv1, (+ time_emb_proj), norm2, act, dropout, conv2.

    x: [B, H, W, C_in]; temb: [B, T] or None (VAE / VQ: then the block has no ``time_emb_proj``).
    Returns [B, H', W', C_out] = (shortcut(x) + h) / output_scale_factor, with H' = 2H (up),
    H/2 (down) or H. time_embedding_norm: "default" adds proj(act(temb)) after conv1;
    "scale_shift" applies norm2(h) * (1 + scale) + shift with [scale, shift] = proj(act(temb)).
    The 1x1 ``conv_shortcut`` exists when C_in != C_out (or use_in_shortcut=True).
    """

    out_channels: int | None = None
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    non_linearity: str = "swish"
    time_embedding_norm: str = "default"
    skip_time_act: bool = False
    output_scale_factor: float = 1.0
    use_in_shortcut: bool | None = None
    up: bool = False
    down: bool = False
    conv_shortcut_bias: bool = True
    conv_2d_out_channels: int | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        if self.time_embedding_norm not in ("default", "scale_shift"):
            raise ConfigError(f"ResnetBlock2D: time_embedding_norm={self.time_embedding_norm!r} is not "
                              "implemented (implemented: 'default', 'scale_shift').")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation(self.non_linearity, DIFFUSERS_ACTIVATION_NAMES, field="non_linearity")
        in_channels = x.shape[-1]
        out_channels = self.out_channels or in_channels
        conv_out_channels = self.conv_2d_out_channels or out_channels
        x = x.astype(self.dtype)

        h = act(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        if self.up:
            x, h = upsample_nearest(x), upsample_nearest(h)
        elif self.down:
            x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="VALID")
        h = conv2d(out_channels, 3, padding=1, name="conv1", **kw)(h)

        t = None
        if temb is not None:
            t = temb.astype(self.dtype)
            if not self.skip_time_act:
                t = act(t)
            mult = 2 if self.time_embedding_norm == "scale_shift" else 1
            t = nn.Dense(mult * out_channels, name="time_emb_proj", **kw)(t)[:, None, None, :]  # [B,1,1,k*C]

        norm2 = group_norm(self.groups_out or self.groups, self.eps, name="norm2", **kw)
        if self.time_embedding_norm == "default":
            if t is not None:
                h = h + t
            h = norm2(h)
        else:
            if t is None:
                raise ValueError("ResnetBlock2D: time_embedding_norm='scale_shift' needs a time embedding "
                                 "`temb`; pass it, or use time_embedding_norm='default'.")
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        h = act(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv2d(conv_out_channels, 3, padding=1, name="conv2", **kw)(h)

        use_shortcut = (in_channels != conv_out_channels) if self.use_in_shortcut is None else self.use_in_shortcut
        if use_shortcut:
            x = conv2d(conv_out_channels, 1, padding=0, use_bias=self.conv_shortcut_bias,
                       name="conv_shortcut", **kw)(x)
        out = x + h
        if self.output_scale_factor != 1:
            out = out / self.output_scale_factor
        return out


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """diffusers' ``Attention`` (its default processor): multi-head self- or cross-attention.

    hidden_states: [B, H, W, C] (spatial, flattened to H*W tokens) or [B, L, C].
    encoder_hidden_states: [B, Lk, D] for cross-attention (to_k / to_v read it), None for self.
    mask: boolean [B, Lk] (True = attend) or None.
    Returns the input's shape: to_out.0(attention) (+ input if residual_connection) / rescale_output_factor.
    ``group_norm`` (norm_num_groups) normalises the input before to_q/to_k/to_v.
    Logits and softmax are always computed in float32, so ``upcast_attention`` / ``upcast_softmax``
    are accepted for compatibility and change nothing.
    attention_control: None (the attention kernel, unchanged), or an AttentionSite
    (jaxgen.nn.attention_control): the probabilities are then formed explicitly (float32 softmax)
    and passed through its controller before they weight the values (Prompt-to-Prompt).
    """

    heads: int = 8
    dim_head: int = 64
    bias: bool = False
    out_bias: bool = True
    upcast_attention: bool = False
    upcast_softmax: bool = False
    norm_num_groups: int | None = None
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    scale_qk: bool = True
    dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None,
                 mask: jax.Array | None = None, deterministic: bool = True, *, attention_control=None) -> jax.Array:
        _check_impl(self.attention_impl)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = hidden_states.astype(self.dtype)
        residual = x
        shape = x.shape
        if x.ndim == 4:
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])  # [B, H*W, C], row-major as torch
        batch, length, query_dim = x.shape
        if self.norm_num_groups is not None:
            x = group_norm(self.norm_num_groups, self.eps, name="group_norm", **kw)(x)
        inner = self.heads * self.dim_head
        context = x if encoder_hidden_states is None else encoder_hidden_states.astype(self.dtype)
        q = nn.Dense(inner, use_bias=self.bias, name="to_q", **kw)(x)
        k = nn.Dense(inner, use_bias=self.bias, name="to_k", **kw)(context)
        v = nn.Dense(inner, use_bias=self.bias, name="to_v", **kw)(context)
        q = q.reshape(batch, length, self.heads, self.dim_head)  # [B, Lq, H, D]
        k = k.reshape(batch, -1, self.heads, self.dim_head)  # [B, Lk, H, D]
        v = v.reshape(batch, -1, self.heads, self.dim_head)
        if mask is not None:
            mask = jnp.asarray(mask, bool)[:, None, None, :]  # [B, 1, 1, Lk]
        scale = self.dim_head ** -0.5 if self.scale_qk else 1.0
        if attention_control is None:
            o = dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=self.attention_impl,
                                      upcast=True)
        else:
            o = controlled_attention(q, k, v, attention_control, is_cross=encoder_hidden_states is not None,
                                     mask=mask, scale=scale)
        o = o.reshape(batch, length, inner)
        o = nn.Dense(query_dim, use_bias=self.out_bias, name="to_out_0", **kw)(o)
        o = nn.Dropout(self.dropout)(o, deterministic=deterministic)
        o = o.reshape(shape)
        if self.residual_connection:
            o = o + residual
        if self.rescale_output_factor != 1:
            o = o / self.rescale_output_factor
        return o


class UNetMidBlock2D(nn.Module):
    """diffusers' ``UNetMidBlock2D``: resnets.0, then (attentions.i, resnets.i+1) for i < num_layers.

    x: [B, H, W, C] -> [B, H, W, C]; temb: [B, T] or None (VAE / VQ).
    attention_head_dim is a head SIZE (None = C: one head). The attention has a group norm with
    ``attn_groups`` groups (None: resnet_groups when resnet_time_scale_shift == "default", else none).
    """

    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    attn_groups: int | None = None
    add_attention: bool = True
    attention_head_dim: int | None = 1
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        head_dim = self.attention_head_dim or channels
        attn_groups = self.attn_groups
        if attn_groups is None and self.resnet_time_scale_shift == "default":
            attn_groups = self.resnet_groups

        def resnet(i):
            return ResnetBlock2D(out_channels=channels, groups=self.resnet_groups, eps=self.resnet_eps,
                                 non_linearity=self.resnet_act_fn, dropout=self.dropout,
                                 time_embedding_norm=self.resnet_time_scale_shift,
                                 output_scale_factor=self.output_scale_factor, name=f"resnets_{i}", **kw)

        x = resnet(0)(x, temb, deterministic)
        for i in range(self.num_layers):
            if self.add_attention:
                x = Attention(heads=channels // head_dim, dim_head=head_dim, bias=True, upcast_softmax=True,
                              norm_num_groups=attn_groups, eps=self.resnet_eps, residual_connection=True,
                              rescale_output_factor=self.output_scale_factor,
                              attention_impl=self.attention_impl, name=f"attentions_{i}", **kw)(x)
            x = resnet(i + 1)(x, temb, deterministic)
        return x


# ------------------------------------------------------------------------------------------------
# transformer blocks (UNet2DConditionModel)
# ------------------------------------------------------------------------------------------------
class GEGLU(nn.Module):
    """proj: [.., D] -> [.., 2*dim_out]; returns a * gelu(gate) with exact (erf) GELU."""

    dim_out: int
    bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.dim_out, use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="proj")(x)
        a, gate = jnp.split(h, 2, axis=-1)
        return a * exact_gelu(gate)


class GELU(nn.Module):
    """proj then GELU (exact, or tanh with approximate="tanh"), diffusers' ``GELU`` activation layer."""

    dim_out: int
    approximate: str = "none"
    bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.dim_out, use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="proj")(x)
        return (tanh_gelu if self.approximate == "tanh" else exact_gelu)(h)


FEED_FORWARD_ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")


class FeedForward(nn.Module):
    """diffusers' ``FeedForward``: net.0 (GEGLU / GELU with its ``proj``), dropout, net.2 (Linear).

    x: [B, L, D] -> [B, L, dim_out or D]; hidden size inner_dim or mult * D.
    """

    dim_out: int | None = None
    mult: int = 4
    dropout: float = 0.0
    activation_fn: str = "geglu"
    final_dropout: bool = False
    inner_dim: int | None = None
    bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        inner = self.inner_dim or int(dim * self.mult)
        if self.activation_fn == "geglu":
            x = GEGLU(inner, bias=self.bias, name="net_0", **kw)(x)
        elif self.activation_fn in ("gelu", "gelu-approximate"):
            x = GELU(inner, approximate="tanh" if self.activation_fn == "gelu-approximate" else "none",
                     bias=self.bias, name="net_0", **kw)(x)
        else:
            raise ConfigError(f"FeedForward: activation_fn={self.activation_fn!r} is not implemented "
                              f"(implemented: {FEED_FORWARD_ACTIVATIONS}).")
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        x = nn.Dense(self.dim_out or dim, use_bias=self.bias, name="net_2", **kw)(x)
        if self.final_dropout:
            x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return x


class BasicTransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock`` with norm_type="layer_norm".

    x: [B, L, D]; encoder_hidden_states: [B, Lk, cross_attention_dim] or None. Returns [B, L, D]:
    x += attn1(norm1(x)) (cross-attention to the encoder states when only_cross_attention);
    x += attn2(norm2(x), encoder states) when cross_attention_dim is set (self-attention with
    double_self_attention); x += ff(norm3(x)). LayerNorms use norm_eps.
    attention_control: None, or an AttentionSite handed to attn1 and attn2 (see Attention).
    """

    num_attention_heads: int
    attention_head_dim: int
    dropout: float = 0.0
    cross_attention_dim: int | None = None
    activation_fn: str = "geglu"
    attention_bias: bool = False
    only_cross_attention: bool = False
    double_self_attention: bool = False
    upcast_attention: bool = False
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    final_dropout: bool = False
    ff_inner_dim: int | None = None
    ff_bias: bool = True
    attention_out_bias: bool = True
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, encoder_hidden_states: jax.Array | None = None,
                 encoder_attention_mask: jax.Array | None = None, deterministic: bool = True, *,
                 attention_control=None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ac = {} if attention_control is None else {"attention_control": attention_control}
        attn = dict(heads=self.num_attention_heads, dim_head=self.attention_head_dim, bias=self.attention_bias,
                    out_bias=self.attention_out_bias, upcast_attention=self.upcast_attention,
                    dropout=self.dropout, attention_impl=self.attention_impl, **kw)

        def norm(name):
            return layer_norm(self.norm_eps, affine=self.norm_elementwise_affine, name=name, **kw)

        context1 = encoder_hidden_states if self.only_cross_attention else None
        mask1 = encoder_attention_mask if self.only_cross_attention else None
        x = x + Attention(name="attn1", **attn)(norm("norm1")(x), context1, mask1, deterministic, **ac)
        if self.cross_attention_dim is not None or self.double_self_attention:
            context2 = None if self.double_self_attention else encoder_hidden_states
            mask2 = None if self.double_self_attention else encoder_attention_mask
            x = x + Attention(name="attn2", **attn)(norm("norm2")(x), context2, mask2, deterministic, **ac)
        ff = FeedForward(dropout=self.dropout, activation_fn=self.activation_fn, final_dropout=self.final_dropout,
                         inner_dim=self.ff_inner_dim, bias=self.ff_bias, name="ff", **kw)
        return x + ff(norm("norm3")(x), deterministic)


class Transformer2DModel(nn.Module):
    """diffusers' ``Transformer2DModel`` on continuous input (the U-Net's spatial transformer).

    x: [B, H, W, C] -> [B, H, W, C]: norm (GroupNorm, eps 1e-6) -> proj_in (1x1 conv, or Linear
    when use_linear_projection) -> transformer_blocks -> proj_out -> + x.
    encoder_hidden_states: [B, L, cross_attention_dim]; encoder_attention_mask: bool [B, L] or None.
    Inner width num_attention_heads * attention_head_dim.
    attention_control: None, or an AttentionSite whose ``layer`` is the block's attention index a;
    transformer_blocks_j get layer a * num_layers + j (see jaxgen.nn.attention_control).
    """

    num_attention_heads: int = 16
    attention_head_dim: int = 88
    out_channels: int | None = None
    num_layers: int = 1
    dropout: float = 0.0
    norm_num_groups: int = 32
    cross_attention_dim: int | None = None
    attention_bias: bool = False
    activation_fn: str = "geglu"
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    double_self_attention: bool = False
    upcast_attention: bool = False
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, encoder_hidden_states: jax.Array | None = None,
                 encoder_attention_mask: jax.Array | None = None, deterministic: bool = True, *,
                 attention_control=None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        b, h, w, c = x.shape
        inner = self.num_attention_heads * self.attention_head_dim
        out_channels = self.out_channels or c
        residual = x
        y = group_norm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            y = nn.Dense(inner, name="proj_in", **kw)(y.reshape(b, h * w, c))  # [B, HW, inner]
        else:
            y = conv2d(inner, 1, padding=0, name="proj_in", **kw)(y).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            ac = {} if attention_control is None else {"attention_control": attention_control.at(
                layer=(attention_control.layer or 0) * self.num_layers + i)}
            y = BasicTransformerBlock(
                self.num_attention_heads, self.attention_head_dim, dropout=self.dropout,
                cross_attention_dim=self.cross_attention_dim, activation_fn=self.activation_fn,
                attention_bias=self.attention_bias, only_cross_attention=self.only_cross_attention,
                double_self_attention=self.double_self_attention, upcast_attention=self.upcast_attention,
                norm_elementwise_affine=self.norm_elementwise_affine, norm_eps=self.norm_eps,
                attention_impl=self.attention_impl, name=f"transformer_blocks_{i}", **kw,
            )(y, encoder_hidden_states, encoder_attention_mask, deterministic, **ac)
        if self.use_linear_projection:
            y = nn.Dense(out_channels, name="proj_out", **kw)(y).reshape(b, h, w, out_channels)
        else:
            y = conv2d(out_channels, 1, padding=0, name="proj_out", **kw)(y.reshape(b, h, w, inner))
        return y + residual
