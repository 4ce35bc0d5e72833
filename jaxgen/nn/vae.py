"""The diffusers autoencoder family: ``Encoder`` / ``Decoder`` and ``AutoencoderKL``.

``Encoder`` and ``Decoder`` are diffusers' (``diffusers.models.autoencoders.vae``), shared by
``AutoencoderKL`` (here) and ``VQModel`` (``jaxgen.nn.vq``):

    Encoder: conv_in -> down_blocks (DownEncoderBlock2D: resnets, then a stride-2 conv that pads
             (0, 1, 0, 1) first) -> mid_block (resnet, single-head attention, resnet) ->
             conv_norm_out -> SiLU -> conv_out (2 * latent channels with double_z).
    Decoder: conv_in -> mid_block -> up_blocks (UpDecoderBlock2D: layers_per_block + 1 resnets,
             then nearest x2 and a 3x3 conv) -> conv_norm_out -> SiLU -> conv_out.

Traps that parity depends on: every norm here has eps 1e-6; the final activation ``conv_act`` is
SiLU whatever ``act_fn`` is (``act_fn`` only reaches the resnets); the mid-block attention has one
head of all channels; the decoder has one more resnet per level than the encoder.
``norm_type="spatial"`` (VQModel only, the MoVQ decoder of Kandinsky) replaces every decoder norm by
``SpatialNorm``: GroupNorm(32 groups, eps 1e-6) modulated by 1x1 convs of the quantized latents.

Images are NHWC float ([-1, 1] by convention), latents NHWC. The blocks reuse
``jaxgen.nn.layers`` (ResnetBlock2D without a time embedding, Downsample2D(padding=0),
Upsample2D, UNetMidBlock2D, Attention).

Like the U-Nets, the models have jaxgen-only runtime fields that are never read from or written
to config.json: ``attention_impl`` ("xla" | "cudnn" | "auto", see jaxgen.nn.attention), ``dtype``
(computation dtype, e.g. jnp.bfloat16) and ``param_dtype``. Set them on a loaded module with
``module.clone(dtype=jnp.bfloat16)``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.config import all_in, is_int
from jaxgen.convert.pretrained import Pretrained
from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.activations import DIFFUSERS_ACTIVATION_NAMES, activation
from jaxgen.nn.attention import IMPLEMENTATIONS
from jaxgen.nn.gaussian import DiagonalGaussian
from jaxgen.nn.layers import (Attention, Downsample2D, ResnetBlock2D, UNetMidBlock2D, Upsample2D,
                              conv2d, group_norm, upsample_nearest)

Dtype = Any

# Fields that describe how jaxgen runs a model, not the model: never read from / written to config.json.
NORM_EPS = 1e-6  # every norm of diffusers' Encoder / Decoder
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
NORM_TYPES = ("group", "spatial")
SPATIAL_NORM_GROUPS = 32  # diffusers' SpatialNorm hard-codes 32 groups


# ------------------------------------------------------------------------------------------------
# spatially conditioned norm (MoVQ decoder)
# ------------------------------------------------------------------------------------------------
class SpatialNorm(nn.Module):
    """diffusers' ``SpatialNorm``: GroupNorm(32, eps 1e-6)(f) * conv_y(zq') + conv_b(zq').

    f: [B, H, W, C]; zq: [B, h, w, Cz], resized to H x W by nearest neighbour (zq'). Returns
    [B, H, W, C]. Children ``norm_layer``, ``conv_y``, ``conv_b`` (1x1 convs Cz -> C).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = f.shape[-1]
        if channels % SPATIAL_NORM_GROUPS:
            raise ConfigError(f"SpatialNorm: {channels} channels; diffusers' SpatialNorm uses "
                              f"{SPATIAL_NORM_GROUPS} groups, so every block_out_channels entry must be a "
                              f"multiple of {SPATIAL_NORM_GROUPS} with norm_type='spatial'.")
        zq = upsample_nearest(zq.astype(self.dtype), tuple(f.shape[1:3]))  # [B, H, W, Cz]
        norm = group_norm(SPATIAL_NORM_GROUPS, NORM_EPS, name="norm_layer", **kw)(f)
        y = conv2d(channels, 1, padding=0, name="conv_y", **kw)(zq)
        b = conv2d(channels, 1, padding=0, name="conv_b", **kw)(zq)
        return norm * y + b


class SpatialResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlockCondNorm2D`` with time_embedding_norm="spatial" (no up/down sampling).

    x: [B, H, W, C_in]; zq: [B, h, w, Cz] (the quantized latents). Returns [B, H, W, C_out] =
    (shortcut(x) + conv2(drop(act(norm2(conv1(act(norm1(x, zq))), zq))))) / output_scale_factor,
    with SpatialNorm norms (their GroupNorms have 32 groups and eps 1e-6, whatever ``groups`` /
    ``eps`` the caller's config holds: diffusers ignores them too).
    """

    out_channels: int
    non_linearity: str = "swish"
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation(self.non_linearity, DIFFUSERS_ACTIVATION_NAMES, field="non_linearity")
        x = x.astype(self.dtype)
        h = act(SpatialNorm(name="norm1", **kw)(x, zq))
        h = conv2d(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
        h = act(SpatialNorm(name="norm2", **kw)(h, zq))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv2d(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        out = x + h
        if self.output_scale_factor != 1:
            out = out / self.output_scale_factor
        return out


class SpatialAttention(nn.Module):
    """diffusers' ``Attention`` with ``spatial_norm_dim``: x + attn(SpatialNorm(x, zq)), one module scope.

    x: [B, H, W, C]; zq: [B, h, w, Cz]. The parameters sit side by side as diffusers stores them:
    ``spatial_norm`` (SpatialNorm) and ``to_q`` / ``to_k`` / ``to_v`` / ``to_out_0`` (a
    ``jaxgen.nn.layers.Attention`` sharing this module's scope). The residual is the input before
    the norm, so the inner Attention runs without its own residual connection.
    """

    heads: int = 1
    dim_head: int = 64
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.spatial_norm = SpatialNorm(**kw)
        self.attn = Attention(heads=self.heads, dim_head=self.dim_head, bias=True, upcast_softmax=True,
                              norm_num_groups=None, residual_connection=False,
                              attention_impl=self.attention_impl, **kw)
        nn.share_scope(self, self.attn)  # to_q, to_k, ... directly under this module, as in diffusers

    def __call__(self, x: jax.Array, zq: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        return x + self.attn(self.spatial_norm(x, zq))


class SpatialMidBlock2D(nn.Module):
    """diffusers' ``UNetMidBlock2D`` with resnet_time_scale_shift="spatial" (the MoVQ decoder's).

    x: [B, H, W, C] -> [B, H, W, C]; zq: [B, h, w, Cz]. resnets.0, then (attentions.i, resnets.i+1);
    one attention head of all C channels, as in the VAE decoders.
    """

    num_layers: int = 1
    resnet_act_fn: str = "swish"
    add_attention: bool = True
    dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]

        def resnet(i):
            return SpatialResnetBlock2D(channels, non_linearity=self.resnet_act_fn, dropout=self.dropout,
                                        name=f"resnets_{i}", **kw)

        x = resnet(0)(x, zq, deterministic)
        for i in range(self.num_layers):
            if self.add_attention:
                x = SpatialAttention(heads=1, dim_head=channels, attention_impl=self.attention_impl,
                                     name=f"attentions_{i}", **kw)(x, zq)
            x = resnet(i + 1)(x, zq, deterministic)
        return x


# ------------------------------------------------------------------------------------------------
# encoder / decoder blocks
# ------------------------------------------------------------------------------------------------
class DownEncoderBlock2D(nn.Module):
    """diffusers' ``DownEncoderBlock2D``: ``num_layers`` resnets (no time embedding), then
    ``downsamplers.0`` (pad (0, 1, 0, 1), 3x3 stride-2 conv) unless it is the last level.

    x: [B, H, W, C_in] -> [B, H', W', out_channels], H' = floor((H - 2) / 2) + 1 with the
    downsampler (H / 2 for even H), else H.
    """

    out_channels: int
    num_layers: int = 1
    resnet_eps: float = NORM_EPS
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    add_downsample: bool = True
    downsample_padding: int = 0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(out_channels=self.out_channels, groups=self.resnet_groups, eps=self.resnet_eps,
                              non_linearity=self.resnet_act_fn, dropout=self.dropout, name=f"resnets_{i}",
                              **kw)(x, None, deterministic)
        if self.add_downsample:
            x = Downsample2D(out_channels=self.out_channels, use_conv=True, padding=self.downsample_padding,
                             name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """diffusers' ``UpDecoderBlock2D``: ``num_layers`` resnets, then ``upsamplers.0`` (nearest x2,
    3x3 conv) unless it is the last level.

    x: [B, H, W, C_in] -> [B, 2H (or H), 2W (or W), out_channels]. norm_type="spatial" uses
    SpatialResnetBlock2D and needs zq [B, h, w, Cz] (the quantized latents).
    """

    out_channels: int
    num_layers: int = 1
    resnet_eps: float = NORM_EPS
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    add_upsample: bool = True
    norm_type: str = "group"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            if self.norm_type == "spatial":
                x = SpatialResnetBlock2D(self.out_channels, non_linearity=self.resnet_act_fn, dropout=self.dropout,
                                         name=f"resnets_{i}", **kw)(x, zq, deterministic)
            else:
                x = ResnetBlock2D(out_channels=self.out_channels, groups=self.resnet_groups, eps=self.resnet_eps,
                                  non_linearity=self.resnet_act_fn, dropout=self.dropout, name=f"resnets_{i}",
                                  **kw)(x, None, deterministic)
        if self.add_upsample:
            x = Upsample2D(out_channels=self.out_channels, use_conv=True, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """diffusers' VAE ``Encoder``.

    x: [B, H, W, in_channels] -> [B, H / 2**(n-1), W / 2**(n-1), out_channels * (2 if double_z else 1)]
    with n = len(block_out_channels) (for H, W multiples of 2**(n-1); other sizes follow the padded
    stride-2 convs: H -> floor((H - 2) / 2) + 1 per level). Output in ``dtype``.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    double_z: bool = True
    mid_block_add_attention: bool = True
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        boc = self.block_out_channels
        x = conv2d(boc[0], 3, padding=1, name="conv_in", **kw)(x.astype(self.dtype))
        for i, block_type in enumerate(self.down_block_types):
            if block_type not in DOWN_BLOCK_TYPES:
                raise ConfigError(f"Encoder: down block type {block_type!r} is not implemented "
                                  f"(implemented: {DOWN_BLOCK_TYPES}).")
            x = DownEncoderBlock2D(boc[i], num_layers=self.layers_per_block, resnet_act_fn=self.act_fn,
                                   resnet_groups=self.norm_num_groups, add_downsample=i < len(boc) - 1,
                                   downsample_padding=0, name=f"down_blocks_{i}", **kw)(x, deterministic)
        x = UNetMidBlock2D(resnet_eps=NORM_EPS, resnet_act_fn=self.act_fn, resnet_groups=self.norm_num_groups,
                           add_attention=self.mid_block_add_attention, attention_head_dim=boc[-1],
                           attention_impl=self.attention_impl, name="mid_block", **kw)(x, None, deterministic)
        x = group_norm(self.norm_num_groups, NORM_EPS, name="conv_norm_out", **kw)(x)
        x = jax.nn.silu(x)  # conv_act: SiLU whatever act_fn is
        out = 2 * self.out_channels if self.double_z else self.out_channels
        return conv2d(out, 3, padding=1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """diffusers' VAE ``Decoder``.

    z: [B, h, w, in_channels] -> [B, h * 2**(n-1), w * 2**(n-1), out_channels], n = len(block_out_channels).
    norm_type="spatial" needs zq: [B, h, w, in_channels] (the quantized latents before
    post_quant_conv), which conditions every norm. Output in ``dtype``.
    """

    in_channels: int = 3
    out_channels: int = 3
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    norm_type: str = "group"
    mid_block_add_attention: bool = True
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, zq: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.norm_type not in NORM_TYPES:
            raise ConfigError(f"Decoder: norm_type={self.norm_type!r}; choose one of {NORM_TYPES}.")
        spatial = self.norm_type == "spatial"
        if spatial and zq is None:
            raise ValueError("Decoder: norm_type='spatial' conditions its norms on the quantized latents; "
                             "pass zq [B, h, w, C].")
        boc = self.block_out_channels
        x = conv2d(boc[-1], 3, padding=1, name="conv_in", **kw)(z.astype(self.dtype))
        if spatial:
            x = SpatialMidBlock2D(resnet_act_fn=self.act_fn, add_attention=self.mid_block_add_attention,
                                  attention_impl=self.attention_impl, name="mid_block", **kw)(x, zq, deterministic)
        else:
            x = UNetMidBlock2D(resnet_eps=NORM_EPS, resnet_act_fn=self.act_fn, resnet_groups=self.norm_num_groups,
                               add_attention=self.mid_block_add_attention, attention_head_dim=boc[-1],
                               attention_impl=self.attention_impl, name="mid_block", **kw)(x, None, deterministic)
        reversed_channels = tuple(reversed(boc))
        for i, block_type in enumerate(self.up_block_types):
            if block_type not in UP_BLOCK_TYPES:
                raise ConfigError(f"Decoder: up block type {block_type!r} is not implemented "
                                  f"(implemented: {UP_BLOCK_TYPES}).")
            x = UpDecoderBlock2D(reversed_channels[i], num_layers=self.layers_per_block + 1,
                                 resnet_act_fn=self.act_fn, resnet_groups=self.norm_num_groups,
                                 add_upsample=i < len(boc) - 1, norm_type=self.norm_type,
                                 name=f"up_blocks_{i}", **kw)(x, zq, deterministic)
        if spatial:
            x = SpatialNorm(name="conv_norm_out", **kw)(x, zq)
        else:
            x = group_norm(self.norm_num_groups, NORM_EPS, name="conv_norm_out", **kw)(x)
        x = jax.nn.silu(x)  # conv_act: SiLU whatever act_fn is
        return conv2d(self.out_channels, 3, padding=1, name="conv_out", **kw)(x)


# ------------------------------------------------------------------------------------------------
# shared config plumbing of the diffusers autoencoders
# ------------------------------------------------------------------------------------------------
class DiffusersAutoencoder(Pretrained):
    """Config reading / writing and checks shared by AutoencoderKL and VQModel.

    Runtime fields (attention_impl, dtype, param_dtype) stay out of config.json; every other field
    is diffusers' own.
    """

    pt_library: ClassVar[str] = "diffusers"
    pt_weights_name: ClassVar[str] = "diffusion_pytorch_model"
    pt_supported: ClassVar[Mapping[str, Any]] = {
        "down_block_types": all_in(DOWN_BLOCK_TYPES),
        "up_block_types": all_in(UP_BLOCK_TYPES),
        "act_fn": DIFFUSERS_ACTIVATION_NAMES,
        "layers_per_block": is_int,
        "norm_num_groups": is_int,
    }

    def _check_config(self) -> None:
        name = type(self).__name__
        self.check_supported()
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"{name}: down_block_types ({len(self.down_block_types)}), up_block_types "
                              f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same "
                              "length (one entry per resolution level).")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ConfigError(f"{name}: attention_impl={self.attention_impl!r}; choose one of {IMPLEMENTATIONS}.")

    def _check_images(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise DataError(f"{type(self).__name__}: images must be NHWC [B, H, W, {self.in_channels}], got shape "
                            f"{tuple(x.shape)}. jaxgen models take channels last: transpose NCHW arrays with "
                            "x.transpose(0, 2, 3, 1).")

    def _check_latents(self, z: jax.Array, channels: int, what: str) -> None:
        if z.ndim != 4 or z.shape[-1] != channels:
            raise DataError(f"{type(self).__name__}: {what} must be NHWC [B, h, w, {channels}], got shape "
                            f"{tuple(z.shape)}.")

    def dummy_inputs(self):
        size = 2 ** (len(self.block_out_channels) - 1)
        return (jnp.zeros((1, size, size, self.in_channels), jnp.float32),), {}


# ------------------------------------------------------------------------------------------------
# AutoencoderKL
# ------------------------------------------------------------------------------------------------
class AutoencoderKL(nn.Module, DiffusersAutoencoder):
    """diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE).

    apply(v, x, method="encode") -> DiagonalGaussian: x [B, H, W, in_channels] float in [-1, 1];
        mean / logvar [B, H / f, W / f, latent_channels] (f = 2**(len(block_out_channels) - 1)),
        logvar clamped to [-30, 20], in x's dtype. ``.sample(key)``, ``.mode()``, ``.kl()``.
    apply(v, z, method="decode") -> x: z [B, h, w, latent_channels] (unscaled: divide diffusion
        latents by ``scaling_factor`` (and add ``shift_factor``) first) -> [B, h f, w f, out_channels]
        in z's dtype.
    apply(v, x, key=None, sample_posterior=False, return_posterior=False) -> reconstruction
        (decode of posterior.mode(), or of posterior.sample(key) with sample_posterior=True);
        (reconstruction, posterior) with return_posterior=True (for a KL loss).
    ``scaling_factor``, ``shift_factor``, ``latents_mean`` / ``latents_std`` and ``force_upcast``
    are stored for pipelines, as in diffusers; the modules do not apply them.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self._check_config()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, act_fn=self.act_fn,
                      mid_block_add_attention=self.mid_block_add_attention, attention_impl=self.attention_impl, **kw)
        self.encoder = Encoder(in_channels=self.in_channels, out_channels=self.latent_channels,
                               down_block_types=self.down_block_types, double_z=True, **common)
        self.decoder = Decoder(in_channels=self.latent_channels, out_channels=self.out_channels,
                               up_block_types=self.up_block_types, norm_type="group", **common)
        c = 2 * self.latent_channels
        self.quant_conv = conv2d(c, 1, padding=0, **kw) if self.use_quant_conv else None
        self.post_quant_conv = conv2d(self.latent_channels, 1, padding=0, **kw) if self.use_post_quant_conv else None

    def encode(self, x: jax.Array, deterministic: bool = True) -> DiagonalGaussian:
        """x: [B, H, W, in_channels] -> DiagonalGaussian over [B, H/f, W/f, latent_channels] (x's dtype)."""
        self._check_images(x)
        moments = self.encoder(x, deterministic)  # [B, h, w, 2 * latent_channels]
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(x.dtype))

    def decode(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        """z: [B, h, w, latent_channels] -> images [B, h f, w f, out_channels] (z's dtype)."""
        self._check_latents(z, self.latent_channels, "latents z")
        h = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            h = self.post_quant_conv(h)
        return self.decoder(h, None, deterministic).astype(z.dtype)

    def __call__(self, x: jax.Array, key: jax.Array | None = None, sample_posterior: bool = False,
                 return_posterior: bool = False, deterministic: bool = True):
        """Reconstruct x [B, H, W, in_channels] -> [B, H, W, out_channels] (for H, W multiples of f).

        key: needed with sample_posterior=True (the posterior draw). return_posterior=True also
        returns the DiagonalGaussian (for the KL term of the training loss).
        """
        if sample_posterior and key is None:
            raise ValueError("AutoencoderKL: sample_posterior=True draws from the posterior; pass key=.")
        posterior = self.encode(x, deterministic)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        out = self.decode(z, deterministic)
        return (out, posterior) if return_posterior else out


def rescale_latent_space(vae: AutoencoderKL, params: Mapping[str, Any], ratio: float) -> dict:
    """Parameters of the same autoencoder with its latents multiplied by ``ratio``: encode gives
    a posterior whose mean is ratio x the old one (its std too: the log-variance moves by
    2 ln ratio), and decode(ratio z) is the old decode(z). Exact up to the log-variance clamp.

    Used to hand a pipeline that imposes its own scaling_factor (diffusers' upscaler: 0.08333)
    latents scaled by another factor s: ratio = s / imposed. Needs quant_conv and post_quant_conv.
    """
    if not (vae.use_quant_conv and vae.use_post_quant_conv):
        raise ConfigError("rescale_latent_space needs an AutoencoderKL with use_quant_conv and use_post_quant_conv "
                          "(the 1x1 convolutions that absorb the scale).")
    r = float(ratio)
    if not r > 0 or not np.isfinite(r):
        raise ConfigError(f"rescale_latent_space: ratio={ratio!r} must be a positive finite number.")
    c = int(vae.latent_channels)
    out = jax.tree_util.tree_map(lambda a: np.array(jax.device_get(a)), dict(params))
    q = out["quant_conv"]
    q["kernel"][..., :c] *= r
    q["bias"][:c] *= r
    q["bias"][c:] += 2.0 * np.log(r)
    out["post_quant_conv"]["kernel"] /= r
    return out
