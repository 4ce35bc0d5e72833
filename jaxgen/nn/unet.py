"""U-Nets compatible with diffusers' ``UNet2DModel`` and ``UNet2DConditionModel``.

Both are Linen modules whose fields are diffusers' config fields (same names, same defaults), so a
diffusers config.json builds them (``jaxgen.load_pretrained``) and ``jaxgen.save_pretrained``
writes folders diffusers loads. Two jaxgen-only fields are never written to config.json:
``attention_impl`` ("xla" | "cudnn" | "auto", see jaxgen.nn.attention) and ``dtype`` / ``param_dtype``
(computation / parameter dtype; e.g. ``dtype=jnp.bfloat16`` with float32 parameters). Change them
on a loaded module with ``module.clone(dtype=jnp.bfloat16, attention_impl="cudnn")``.

The trap in the names: ``attention_head_dim`` is a head SIZE in UNet2DModel (None: one head per
block) but the NUMBER OF HEADS in UNet2DConditionModel (diffusers' historical naming; its
``num_attention_heads``, when set, wins).

Images are NHWC: ``sample`` [B, H, W, C] float; the output has the sample's shape (out_channels)
and dtype.

``CrossAttnEncoder`` is UNet2DConditionModel's encoder half (embeddings, conv_in, down blocks, mid
block) as methods; ``jaxgen.nn.controlnet.ControlNetModel`` mixes in the same code, so a ControlNet
and its U-Net name their encoder parameters alike. UNet2DConditionModel takes a ControlNet's
outputs as ``down_block_additional_residuals`` / ``mid_block_additional_residual`` (diffusers' names).
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.convert.config import all_in, is_int
from jaxgen.convert.pretrained import Pretrained
from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.activations import DIFFUSERS_ACTIVATION_NAMES, activation
from jaxgen.nn.attention import IMPLEMENTATIONS
from jaxgen.nn.layers import (Attention, Downsample2D, GaussianFourierProjection, ResnetBlock2D,
                              TimestepEmbedding, Transformer2DModel, UNetMidBlock2D, Upsample2D,
                              conv2d, get_timestep_embedding, group_norm)

Dtype = Any

# Fields that describe how jaxgen runs a model, not the model: never read from / written to config.json.


# ------------------------------------------------------------------------------------------------
# U-Net blocks (diffusers' unet_2d_blocks), NHWC
# ------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """Fields every U-Net block shares; ``resnet`` builds its ResnetBlock2D children."""

    out_channels: int
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    resnet_time_scale_shift: str = "default"
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, name: str, **extra) -> ResnetBlock2D:
        return ResnetBlock2D(out_channels=self.out_channels, groups=self.resnet_groups, eps=self.resnet_eps,
                             non_linearity=self.resnet_act_fn, time_embedding_norm=self.resnet_time_scale_shift,
                             output_scale_factor=self.output_scale_factor, dropout=self.dropout, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name, **extra)

    def spatial_attention(self, name: str, head_dim: int | None) -> Attention:
        """The attention of AttnDownBlock2D / AttnUpBlock2D; head_dim is a head size (None: one head)."""
        head_dim = head_dim or self.out_channels
        return Attention(heads=self.out_channels // head_dim, dim_head=head_dim, bias=True, upcast_softmax=True,
                         norm_num_groups=self.resnet_groups, eps=self.resnet_eps, residual_connection=True,
                         rescale_output_factor=self.output_scale_factor, attention_impl=self.attention_impl,
                         dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class _CrossAttnFields(nn.Module):
    """Fields of the blocks that hold Transformer2DModels."""

    num_attention_heads: int = 1
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False

    def transformer(self, block: _Block, i: int, name: str, only_cross_attention: bool) -> Transformer2DModel:
        layers = self.transformer_layers_per_block
        n = layers if isinstance(layers, int) else layers[i]
        return Transformer2DModel(
            self.num_attention_heads, block.out_channels // self.num_attention_heads, num_layers=n,
            cross_attention_dim=self.cross_attention_dim, norm_num_groups=block.resnet_groups,
            use_linear_projection=self.use_linear_projection, only_cross_attention=only_cross_attention,
            upcast_attention=self.upcast_attention, attention_impl=block.attention_impl, dtype=block.dtype,
            param_dtype=block.param_dtype, name=name)


class DownBlock2D(_Block):
    """num_layers ResnetBlock2Ds then a stride-2 conv (downsamplers.0) when add_downsample.

    x: [B, H, W, C_in] -> ([B, H/2, W/2, out], skips: one [B, h, w, out] per resnet and downsampler).
    """

    add_downsample: bool = True
    downsample_padding: int = 1

    def downsample(self, x, temb, deterministic, kind: str | None = "conv"):
        if kind == "conv":
            return Downsample2D(self.out_channels, use_conv=True, padding=self.downsample_padding,
                                dtype=self.dtype, param_dtype=self.param_dtype, name="downsamplers_0")(x)
        return self.resnet("downsamplers_0", down=True)(x, temb, deterministic)

    @nn.compact
    def __call__(self, x, temb, deterministic: bool = True):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
            skips.append(x)
        if self.add_downsample:
            x = self.downsample(x, temb, deterministic)
            skips.append(x)
        return x, tuple(skips)


class AttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a spatial Attention (head size attention_head_dim) after each resnet.

    downsample_type: "conv" (stride-2 conv), "resnet" (ResnetBlock2D with down=True) or None.
    """

    attention_head_dim: int | None = 1
    downsample_type: str | None = "conv"

    @nn.compact
    def __call__(self, x, temb, deterministic: bool = True):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
            x = self.spatial_attention(f"attentions_{i}", self.attention_head_dim)(x)
            skips.append(x)
        if self.downsample_type is not None:
            x = self.downsample(x, temb, deterministic, self.downsample_type)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(_CrossAttnFields, DownBlock2D):
    """DownBlock2D with a Transformer2DModel (num_attention_heads heads) after each resnet.

    encoder_hidden_states: [B, L, cross_attention_dim]; encoder_attention_mask: bool [B, L] or None.
    attention_control: None, or an AttentionSite (jaxgen.nn.attention_control); attentions_i get layer i.
    """

    @nn.compact
    def __call__(self, x, temb, encoder_hidden_states=None, encoder_attention_mask=None,
                 deterministic: bool = True, *, attention_control=None):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
            x = self.transformer(self, i, f"attentions_{i}", self.only_cross_attention)(
                x, encoder_hidden_states, encoder_attention_mask, deterministic,
                **_at(attention_control, layer=i))
            skips.append(x)
        if self.add_downsample:
            x = self.downsample(x, temb, deterministic)
            skips.append(x)
        return x, tuple(skips)


class UpBlock2D(_Block):
    """num_layers ResnetBlock2Ds, each on concat([x, skip], channels); then x2 upsampling + conv.

    x: [B, h, w, C]; skips: the matching down-path outputs, consumed from the end.
    upsample_size: (H, W) to upsample to (when the input size is not a multiple of 2**depth).
    """

    add_upsample: bool = True

    def upsample(self, x, temb, upsample_size, deterministic, kind: str | None = "conv"):
        if kind == "conv":
            return Upsample2D(self.out_channels, use_conv=True, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="upsamplers_0")(x, upsample_size)
        return self.resnet("upsamplers_0", up=True)(x, temb, deterministic)

    @nn.compact
    def __call__(self, x, skips: Sequence[jax.Array], temb, upsample_size=None, deterministic: bool = True):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
        if self.add_upsample:
            x = self.upsample(x, temb, upsample_size, deterministic)
        return x


class AttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a spatial Attention after each resnet; upsample_type "conv", "resnet" or None."""

    attention_head_dim: int | None = 1
    upsample_type: str | None = "conv"

    @nn.compact
    def __call__(self, x, skips, temb, upsample_size=None, deterministic: bool = True):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
            x = self.spatial_attention(f"attentions_{i}", self.attention_head_dim)(x)
        if self.upsample_type is not None:
            x = self.upsample(x, temb, upsample_size, deterministic, self.upsample_type)
        return x


class CrossAttnUpBlock2D(_CrossAttnFields, UpBlock2D):
    """UpBlock2D with a Transformer2DModel after each resnet (attention_control: as CrossAttnDownBlock2D)."""

    @nn.compact
    def __call__(self, x, skips, temb, encoder_hidden_states=None, encoder_attention_mask=None,
                 upsample_size=None, deterministic: bool = True, *, attention_control=None):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
            x = self.transformer(self, i, f"attentions_{i}", self.only_cross_attention)(
                x, encoder_hidden_states, encoder_attention_mask, deterministic,
                **_at(attention_control, layer=i))
        if self.add_upsample:
            x = self.upsample(x, temb, upsample_size, deterministic)
        return x


class UNetMidBlock2DCrossAttn(_CrossAttnFields, _Block):
    """resnets.0, then (attentions.i = Transformer2DModel, resnets.i+1) for i < num_layers.

    x: [B, h, w, C] -> same shape. (diffusers gives the mid block no only_cross_attention.)
    attention_control: as CrossAttnDownBlock2D.
    """

    @nn.compact
    def __call__(self, x, temb, encoder_hidden_states=None, encoder_attention_mask=None,
                 deterministic: bool = True, *, attention_control=None):
        x = self.resnet("resnets_0")(x, temb, deterministic)
        for i in range(self.num_layers):
            x = self.transformer(self, i, f"attentions_{i}", False)(
                x, encoder_hidden_states, encoder_attention_mask, deterministic,
                **_at(attention_control, layer=i))
            x = self.resnet(f"resnets_{i + 1}")(x, temb, deterministic)
        return x


# ------------------------------------------------------------------------------------------------
# shared model plumbing
# ------------------------------------------------------------------------------------------------
def _at(attention_control, **where) -> dict:
    """{"attention_control": the site with ``where`` set}, or {} without attention control (so
    the uncontrolled call is exactly the call without the keyword)."""
    return {} if attention_control is None else {"attention_control": attention_control.at(**where)}


def _per_block(value, n: int, field: str, owner: str) -> tuple:
    """An int/bool/None field, or a tuple with one entry per block, as an n-tuple."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ConfigError(f"{owner}: {field} has {len(value)} entries but there are {n} down blocks; "
                              "give one per block (or a single value).")
        return tuple(value)
    return (value,) * n


def _batch_timesteps(timestep, batch: int) -> jax.Array:
    """A scalar, [1] or [B] timestep as [B] (dtype kept: int or float)."""
    t = jnp.asarray(timestep)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise DataError(f"timestep must be a scalar, [1] or [B={batch}]; got shape {t.shape}.")
    return jnp.broadcast_to(t.reshape(-1), (batch,))


def _check_sample(sample, in_channels: int, owner: str) -> None:
    if sample.ndim != 4 or sample.shape[-1] != in_channels:
        raise DataError(f"{owner}: sample must be NHWC [B, H, W, {in_channels}], got shape {tuple(sample.shape)}. "
                        "jaxgen models take channels last: transpose NCHW arrays with x.transpose(0, 2, 3, 1).")


class _DiffusersUNet(Pretrained):
    """Config reading/writing shared by both U-Nets: runtime fields stay out of config.json."""

    pt_library: ClassVar[str] = "diffusers"
    pt_weights_name: ClassVar[str] = "diffusion_pytorch_model"

    def _check_common(self) -> None:
        """pt_supported values, matching block lists, a known attention_impl; else a ConfigError."""
        name = type(self).__name__
        self.check_supported()
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"{name}: down_block_types ({len(self.down_block_types)}), up_block_types "
                              f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length.")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ConfigError(f"{type(self).__name__}: attention_impl={self.attention_impl!r}; choose one of "
                              f"{IMPLEMENTATIONS}.")


def _time_projection(module, kind: str, flip_sin_to_cos: bool, freq_shift: float, channels: int,
                     fourier_size: int, fourier_scale: float, fourier_log: bool, fourier_flip: bool,
                     num_train_timesteps: int | None):
    """The ``time_proj`` function of a U-Net: [B] timesteps -> [B, D] float32 features."""
    if kind == "positional":
        return lambda t: get_timestep_embedding(t, channels, flip_sin_to_cos=flip_sin_to_cos,
                                                downscale_freq_shift=freq_shift)
    if kind == "fourier":
        return GaussianFourierProjection(fourier_size, scale=fourier_scale, log=fourier_log,
                                         flip_sin_to_cos=fourier_flip, name="time_proj")
    if kind == "learned":
        if num_train_timesteps is None:
            raise ConfigError(f"{type(module).__name__}: time_embedding_type='learned' needs num_train_timesteps.")
        embed = nn.Embed(num_train_timesteps, channels, param_dtype=module.param_dtype, name="time_proj")
        return lambda t: embed(t.astype(jnp.int32)).astype(jnp.float32)
    raise ConfigError(f"{type(module).__name__}: time_embedding_type={kind!r} is not implemented.")


# ------------------------------------------------------------------------------------------------
# UNet2DModel
# ------------------------------------------------------------------------------------------------
class UNet2DModel(nn.Module, _DiffusersUNet):
    """diffusers' ``UNet2DModel`` (unconditional / class-conditional DDPM U-Net).

    apply({"params": p}, sample, timestep, class_labels=None, deterministic=True) -> [B, H, W, out_channels]
      sample: [B, H, W, in_channels] float (H, W multiples of 2**(len(block_out_channels) - 1));
      timestep: scalar, [1] or [B] (int or float); class_labels: int [B] (num_class_embeds),
      [B] timesteps (class_embed_type="timestep") or [B, 4*C0] (class_embed_type="identity").
      deterministic=False applies dropout with the "dropout" rng.
    attention_head_dim is the attention HEAD SIZE (None: one head of all channels).
    """

    sample_size: Any = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    pt_supported: ClassVar[Mapping[str, Any]] = {
        "down_block_types": all_in(("DownBlock2D", "AttnDownBlock2D")),
        "up_block_types": all_in(("UpBlock2D", "AttnUpBlock2D")),
        "mid_block_type": lambda v: v in (None, "UNetMidBlock2D"),
        "time_embedding_type": ("positional", "fourier", "learned"),
        "downsample_type": ("conv", "resnet"),
        "upsample_type": ("conv", "resnet"),
        "act_fn": DIFFUSERS_ACTIVATION_NAMES,
        "resnet_time_scale_shift": ("default", "scale_shift"),
        "class_embed_type": ("timestep", "identity"),
        "norm_num_groups": is_int,
        "layers_per_block": is_int,
    }

    def dummy_inputs(self):
        n = len(self.block_out_channels)
        sample = jnp.zeros((1, 2 ** (n - 1), 2 ** (n - 1), self.in_channels), jnp.float32)
        labels = None
        if self.class_embed_type == "identity":
            labels = jnp.zeros((1, self.time_embedding_dim or 4 * self.block_out_channels[0]), jnp.float32)
        elif self.class_embed_type == "timestep" or self.num_class_embeds is not None:
            labels = jnp.zeros((1,), jnp.int32)
        return (sample, jnp.ones((1,), jnp.float32)), {"class_labels": labels}

    def _check_config(self):
        self._check_common()

    @nn.compact
    def __call__(self, sample, timestep, class_labels=None, deterministic: bool = True):
        self._check_config()
        _check_sample(sample, self.in_channels, "UNet2DModel")
        out_dtype = sample.dtype
        boc = self.block_out_channels
        n = len(boc)
        factor = 2 ** (n - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise DataError(f"UNet2DModel: sample height and width must be multiples of {factor} "
                            f"(2**(len(block_out_channels)-1)); got {sample.shape[1]}x{sample.shape[2]}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = sample.shape[0]
        x = sample.astype(self.dtype)
        if self.center_input_sample:
            x = 2 * x - 1.0

        # 1. time (and class) embedding, [B, 4*C0]
        timesteps = _batch_timesteps(timestep, batch)
        fourier = self.time_embedding_type == "fourier"
        time_proj = _time_projection(self, self.time_embedding_type, self.flip_sin_to_cos, self.freq_shift, boc[0],
                                     boc[0], 16.0, True, False, self.num_train_timesteps)
        time_embed_dim = self.time_embedding_dim or boc[0] * 4
        emb = TimestepEmbedding(time_embed_dim, name="time_embedding", **kw)(time_proj(timesteps))
        if self.class_embed_type is not None or self.num_class_embeds is not None:
            if class_labels is None:
                raise DataError("UNet2DModel: this model is class-conditional; pass class_labels.")
            if self.class_embed_type == "timestep":
                class_emb = TimestepEmbedding(time_embed_dim, name="class_embedding", **kw)(
                    time_proj(jnp.asarray(class_labels).reshape(-1)))
            elif self.class_embed_type == "identity":
                class_emb = jnp.asarray(class_labels, self.dtype)
            else:
                class_emb = nn.Embed(self.num_class_embeds, time_embed_dim, name="class_embedding", **kw)(
                    jnp.asarray(class_labels, jnp.int32))
            emb = emb + class_emb.astype(emb.dtype)
        elif class_labels is not None:
            raise DataError("UNet2DModel: class_labels given, but the model has no class embedding "
                            "(set num_class_embeds or class_embed_type).")

        # 2. down
        x = conv2d(boc[0], 3, padding=1, name="conv_in", **kw)(x)
        skips = [x]
        common = dict(num_layers=self.layers_per_block, resnet_eps=self.norm_eps, resnet_act_fn=self.act_fn,
                      resnet_groups=self.norm_num_groups, resnet_time_scale_shift=self.resnet_time_scale_shift,
                      dropout=self.dropout, attention_impl=self.attention_impl, **kw)
        for i, kind in enumerate(self.down_block_types):
            last = i == n - 1
            if kind == "DownBlock2D":
                block = DownBlock2D(boc[i], add_downsample=not last, downsample_padding=self.downsample_padding,
                                    name=f"down_blocks_{i}", **common)
            else:
                block = AttnDownBlock2D(boc[i], attention_head_dim=self.attention_head_dim,
                                        downsample_padding=self.downsample_padding,
                                        downsample_type=None if last else self.downsample_type,
                                        name=f"down_blocks_{i}", **common)
            x, res = block(x, emb, deterministic)
            skips.extend(res)

        # 3. mid
        if self.mid_block_type is not None:
            x = UNetMidBlock2D(resnet_eps=self.norm_eps, resnet_act_fn=self.act_fn,
                               output_scale_factor=self.mid_block_scale_factor,
                               resnet_time_scale_shift=self.resnet_time_scale_shift,
                               attention_head_dim=self.attention_head_dim or boc[-1],
                               resnet_groups=self.norm_num_groups, attn_groups=self.attn_norm_num_groups,
                               add_attention=self.add_attention, dropout=self.dropout,
                               attention_impl=self.attention_impl, name="mid_block", **kw)(x, emb, deterministic)

        # 4. up
        common["num_layers"] = self.layers_per_block + 1
        rev = tuple(reversed(boc))
        for i, kind in enumerate(self.up_block_types):
            last = i == n - 1
            if kind == "UpBlock2D":
                block = UpBlock2D(rev[i], add_upsample=not last, name=f"up_blocks_{i}", **common)
            else:
                block = AttnUpBlock2D(rev[i], attention_head_dim=self.attention_head_dim,
                                      upsample_type=None if last else self.upsample_type,
                                      name=f"up_blocks_{i}", **common)
            k = common["num_layers"]
            res, skips = skips[-k:], skips[:-k]
            x = block(x, res, emb, None, deterministic)

        # 5. out
        x = group_norm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(x)
        x = conv2d(self.out_channels, 3, padding=1, name="conv_out", **kw)(jax.nn.silu(x))
        if fourier:
            x = x / timesteps.reshape(batch, 1, 1, 1).astype(x.dtype)
        return x.astype(out_dtype)


# ------------------------------------------------------------------------------------------------
# the conditional encoder (shared by UNet2DConditionModel and ControlNetModel)
# ------------------------------------------------------------------------------------------------
class CrossAttnEncoder:
    """The encoder half of UNet2DConditionModel, as methods called from a Linen module's compact
    ``__call__``: the time embedding (+ class and added embeddings), conv_in, the down blocks and
    the mid block.

    UNet2DConditionModel and ``jaxgen.nn.controlnet.ControlNetModel`` mix it in: diffusers builds a
    ControlNet's encoder from the same config fields and blocks as the U-Net's, and
    ``ControlNetModel.from_unet`` copies these weights, so both hosts name the submodules alike
    (time_embedding, class_embedding, add_embedding, conv_in, down_blocks_i, mid_block).

    The host has diffusers' fields of these names: in_channels, block_out_channels,
    down_block_types, mid_block_type, layers_per_block, attention_head_dim, num_attention_heads,
    transformer_layers_per_block, only_cross_attention, cross_attention_dim, use_linear_projection,
    upcast_attention, downsample_padding, mid_block_scale_factor, act_fn, norm_num_groups, norm_eps,
    resnet_time_scale_shift, dropout, flip_sin_to_cos, freq_shift, time_embedding_type,
    time_embedding_dim, timestep_post_act, time_cond_proj_dim, time_embedding_act_fn,
    class_embed_type, num_class_embeds, class_embeddings_concat,
    projection_class_embeddings_input_dim, addition_embed_type, addition_time_embed_dim,
    conv_in_kernel, attention_impl, dtype, param_dtype (ControlNetModel fixes the ones diffusers'
    ControlNet lacks as class constants).
    """

    def _cross_attention_width(self) -> int:
        c = self.cross_attention_dim
        return c if is_int(c) else c[0]

    def _time_embed_dim(self) -> int:
        if self.time_embedding_type == "fourier":
            dim = self.time_embedding_dim or self.block_out_channels[0] * 2
            if dim % 2:
                raise ConfigError(f"{type(self).__name__}: time_embedding_dim must be even with fourier embeddings.")
            return dim
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    def _class_timestep_act(self) -> str:
        """The activation of class_embed_type="timestep"'s TimestepEmbedding (act_fn in the U-Net)."""
        return self.act_fn

    def _per_block_settings(self) -> dict[str, tuple]:
        """heads, layers, tlayers (transformer layers), only_cross: one entry per down block."""
        name, n = type(self).__name__, len(self.block_out_channels)
        return dict(
            heads=_per_block(self.num_attention_heads or self.attention_head_dim, n, "attention_head_dim", name),
            layers=_per_block(self.layers_per_block, n, "layers_per_block", name),
            tlayers=_per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block", name),
            only_cross=_per_block(self.only_cross_attention, n, "only_cross_attention", name))

    def _block_kwargs(self) -> tuple[dict, dict]:
        """(fields of every block, fields of the cross-attention blocks)."""
        common = dict(resnet_eps=self.norm_eps, resnet_act_fn=self.act_fn, resnet_groups=self.norm_num_groups,
                      resnet_time_scale_shift=self.resnet_time_scale_shift, dropout=self.dropout,
                      attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        cross = dict(cross_attention_dim=self._cross_attention_width(),
                     use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention)
        return common, cross

    def _dummy_conditions(self) -> dict[str, Any]:
        """The keyword inputs (class_labels, added_cond_kwargs, timestep_cond) of a batch-1 dummy call."""
        kwargs: dict[str, Any] = {}
        if self.class_embed_type == "identity":
            kwargs["class_labels"] = jnp.zeros((1, self._time_embed_dim()), jnp.float32)
        elif self.class_embed_type in ("projection", "simple_projection"):
            kwargs["class_labels"] = jnp.zeros((1, self.projection_class_embeddings_input_dim), jnp.float32)
        elif self.class_embed_type == "timestep" or self.num_class_embeds is not None:
            kwargs["class_labels"] = jnp.zeros((1,), jnp.int32)
        if self.addition_embed_type == "text_time":
            text = self.projection_class_embeddings_input_dim - self.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": jnp.zeros((1, text), jnp.float32),
                                           "time_ids": jnp.zeros((1, 1), jnp.float32)}
        if self.time_cond_proj_dim is not None:
            kwargs["timestep_cond"] = jnp.zeros((1, self.time_cond_proj_dim), jnp.float32)
        return kwargs

    def _embedding(self, timestep, batch: int, class_labels=None, timestep_cond=None,
                   added_cond_kwargs: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """The time embedding [B, T] (+ class embedding, + added text_time embedding, then
        time_embedding_act_fn). timestep: scalar, [1] or [B]."""
        name = type(self).__name__
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c0 = self.block_out_channels[0]
        timesteps = _batch_timesteps(timestep, batch)
        time_embed_dim = self._time_embed_dim()
        time_proj = _time_projection(self, self.time_embedding_type, self.flip_sin_to_cos, self.freq_shift, c0,
                                     time_embed_dim // 2, 1.0, False, self.flip_sin_to_cos, None)
        t_emb = time_proj(timesteps).astype(self.dtype)
        emb = TimestepEmbedding(time_embed_dim, act_fn=self.act_fn, post_act_fn=self.timestep_post_act,
                                cond_proj_dim=self.time_cond_proj_dim, name="time_embedding", **kw)(
            t_emb, timestep_cond)

        if self.class_embed_type is not None or self.num_class_embeds is not None:
            if class_labels is None:
                raise DataError(f"{name}: this model is class-conditional; pass class_labels.")
            labels = jnp.asarray(class_labels)
            if self.class_embed_type is None:
                class_emb = nn.Embed(self.num_class_embeds, time_embed_dim, name="class_embedding", **kw)(
                    labels.astype(jnp.int32))
            elif self.class_embed_type == "timestep":
                class_emb = TimestepEmbedding(time_embed_dim, act_fn=self._class_timestep_act(),
                                              name="class_embedding", **kw)(
                    time_proj(labels.reshape(-1)).astype(self.dtype))
            elif self.class_embed_type == "identity":
                class_emb = labels.astype(self.dtype)
            elif self.class_embed_type == "projection":
                class_emb = TimestepEmbedding(time_embed_dim, name="class_embedding", **kw)(labels.astype(self.dtype))
            else:  # simple_projection
                class_emb = nn.Dense(time_embed_dim, name="class_embedding", **kw)(labels.astype(self.dtype))
            class_emb = class_emb.astype(self.dtype)
            emb = jnp.concatenate([emb, class_emb], -1) if self.class_embeddings_concat else emb + class_emb

        if self.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise DataError(f"{name}: addition_embed_type='text_time' needs added_cond_kwargs="
                                "{'text_embeds': [B, D], 'time_ids': [B, N]}.")
            text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
            time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
            time_embeds = get_timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                                                 flip_sin_to_cos=self.flip_sin_to_cos,
                                                 downscale_freq_shift=self.freq_shift)
            time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # [B, N * addition_time_embed_dim]
            add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], -1).astype(self.dtype)
            emb = emb + TimestepEmbedding(time_embed_dim, name="add_embedding", **kw)(add_embeds)
        if self.time_embedding_act_fn is not None:
            emb = activation(self.time_embedding_act_fn, DIFFUSERS_ACTIVATION_NAMES,
                             field="time_embedding_act_fn")(emb)
        return emb

    def _conv_in(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in_channels] -> [B, H, W, block_out_channels[0]]."""
        pad = (self.conv_in_kernel - 1) // 2
        return conv2d(self.block_out_channels[0], self.conv_in_kernel, padding=pad, name="conv_in",
                      dtype=self.dtype, param_dtype=self.param_dtype)(x)

    def _down(self, x, emb, ctx, encoder_attention_mask, deterministic: bool, *,
              attention_control=None) -> tuple[jax.Array, list]:
        """The down blocks. x: conv_in's output [B, H, W, C0]; ctx: [B, L, cross_attention_dim].
        Returns (x at the lowest resolution, skips): skips[0] is x itself, then every resnet's and
        downsampler's output, in order (what the up path consumes and a ControlNet adds to).
        attention_control: None or an AttentionSite (place "down", block i)."""
        boc, n = self.block_out_channels, len(self.block_out_channels)
        per = self._per_block_settings()
        common, cross = self._block_kwargs()
        skips = [x]
        for i, kind in enumerate(self.down_block_types):
            last = i == n - 1
            if kind == "CrossAttnDownBlock2D":
                x, res = CrossAttnDownBlock2D(
                    boc[i], num_layers=per["layers"][i], add_downsample=not last,
                    downsample_padding=self.downsample_padding, num_attention_heads=per["heads"][i],
                    transformer_layers_per_block=per["tlayers"][i], only_cross_attention=per["only_cross"][i],
                    name=f"down_blocks_{i}", **cross, **common,
                )(x, emb, ctx, encoder_attention_mask, deterministic,
                  **_at(attention_control, place="down", block=i))
            else:
                x, res = DownBlock2D(boc[i], num_layers=per["layers"][i], add_downsample=not last,
                                     downsample_padding=self.downsample_padding, name=f"down_blocks_{i}",
                                     **common)(x, emb, deterministic)
            skips.extend(res)
        return x, skips

    def _mid(self, x, emb, ctx, encoder_attention_mask, deterministic: bool, *, attention_control=None) -> jax.Array:
        """The mid block (mid_block_type; None: x unchanged). x: [B, h, w, C_last] -> same shape.
        attention_control: None or an AttentionSite (place "mid", block 0)."""
        common, cross = self._block_kwargs()
        per = self._per_block_settings()
        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            return UNetMidBlock2DCrossAttn(self.block_out_channels[-1], output_scale_factor=self.mid_block_scale_factor,
                                           num_attention_heads=per["heads"][-1],
                                           transformer_layers_per_block=per["tlayers"][-1], name="mid_block",
                                           **cross, **common)(x, emb, ctx, encoder_attention_mask, deterministic,
                                                              **_at(attention_control, place="mid", block=0))
        if self.mid_block_type == "UNetMidBlock2D":
            return UNetMidBlock2D(num_layers=0, add_attention=False, resnet_eps=self.norm_eps,
                                  resnet_act_fn=self.act_fn, resnet_groups=self.norm_num_groups,
                                  output_scale_factor=self.mid_block_scale_factor,
                                  resnet_time_scale_shift=self.resnet_time_scale_shift, dropout=self.dropout,
                                  name="mid_block", dtype=self.dtype, param_dtype=self.param_dtype)(
                x, emb, deterministic)
        return x


# ------------------------------------------------------------------------------------------------
# UNet2DConditionModel
# ------------------------------------------------------------------------------------------------
_COND_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_COND_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


class UNet2DConditionModel(nn.Module, CrossAttnEncoder, _DiffusersUNet):
    """diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x family; SDXL-style text_time).

    apply({"params": p}, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
          added_cond_kwargs=None, encoder_attention_mask=None, deterministic=True) -> [B, H, W, out_channels]
      sample: [B, H, W, in_channels] float (any H, W; non-multiples of 2**depth upsample to the skip size);
      timestep: scalar, [1] or [B]; encoder_hidden_states: [B, L, cross_attention_dim]
      (encoder_hid_dim with encoder_hid_dim_type="text_proj"); encoder_attention_mask: bool [B, L];
      class_labels as in UNet2DModel, or [B, projection_class_embeddings_input_dim] for "projection";
      timestep_cond: [B, time_cond_proj_dim]; added_cond_kwargs (addition_embed_type="text_time"):
      {"text_embeds": [B, D_text], "time_ids": [B, N]}; deterministic=False applies dropout with the
      "dropout" rng; keyword-only down_block_additional_residuals (one array per down-path skip)
      and mid_block_additional_residual: a ControlNet's residuals, added as diffusers adds them;
      keyword-only attention_control: None, or an AttentionSite whose controller sees every
      attention layer's probabilities (jaxgen.nn.attention_control.apply_controlled; Prompt-to-Prompt).
    attention_head_dim is the NUMBER OF HEADS per block (int or one per block), as in diffusers;
    num_attention_heads, if set, takes precedence (saved as attention_head_dim, which diffusers reads).
    """

    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    # resnet_skip_time_act, resnet_out_scale_factor, cross_attention_norm, mid_block_only_cross_attention
    # and addition_embed_type_num_heads only reach block types jaxgen does not implement: any value is fine.
    pt_supported: ClassVar[Mapping[str, Any]] = {
        "down_block_types": all_in(_COND_DOWN),
        "up_block_types": all_in(_COND_UP),
        "mid_block_type": lambda v: v in (None, "UNetMidBlock2DCrossAttn", "UNetMidBlock2D"),
        "dual_cross_attention": (False,),
        "attention_type": ("default",),
        "class_embed_type": ("timestep", "identity", "projection", "simple_projection"),
        "addition_embed_type": ("text_time",),
        "encoder_hid_dim_type": ("text_proj",),
        "time_embedding_type": ("positional", "fourier"),
        "resnet_time_scale_shift": ("default", "scale_shift"),
        "act_fn": DIFFUSERS_ACTIVATION_NAMES,
        "time_embedding_act_fn": DIFFUSERS_ACTIVATION_NAMES,
        "timestep_post_act": DIFFUSERS_ACTIVATION_NAMES,
        "norm_num_groups": is_int,
        "cross_attention_dim": lambda v: is_int(v) or (isinstance(v, tuple) and len(set(v)) == 1),
    }

    # -- config -----------------------------------------------------------------------------
    def pt_config(self) -> dict[str, Any]:
        cfg = super().pt_config()
        if self.num_attention_heads is not None:
            # diffusers refuses num_attention_heads and reads the head count from attention_head_dim
            cfg["attention_head_dim"], cfg["num_attention_heads"] = self.num_attention_heads, None
        return cfg

    def _check_config(self):
        self._check_common()
        name = type(self).__name__
        if self.encoder_hid_dim_type is not None and self.encoder_hid_dim is None:
            raise ConfigError(f"{name}: encoder_hid_dim_type={self.encoder_hid_dim_type!r} needs encoder_hid_dim.")
        if self.class_embed_type in ("projection", "simple_projection") and \
                self.projection_class_embeddings_input_dim is None:
            raise ConfigError(f"{name}: class_embed_type={self.class_embed_type!r} needs "
                              "projection_class_embeddings_input_dim.")
        if self.addition_embed_type == "text_time" and (self.addition_time_embed_dim is None or
                                                        self.projection_class_embeddings_input_dim is None):
            raise ConfigError(f"{name}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim.")

    def dummy_inputs(self):
        n = len(self.block_out_channels)
        s = 2 ** (n - 1)
        sample = jnp.zeros((1, s, s, self.in_channels), jnp.float32)
        ctx = jnp.zeros((1, 1, self.encoder_hid_dim if self.encoder_hid_dim_type == "text_proj"
                         else self._cross_attention_width()), jnp.float32)
        return (sample, jnp.ones((1,), jnp.float32), ctx), self._dummy_conditions()

    # -- forward ----------------------------------------------------------------------------
    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                 added_cond_kwargs: Mapping[str, jax.Array] | None = None, encoder_attention_mask=None,
                 deterministic: bool = True, *, down_block_additional_residuals: Sequence[jax.Array] | None = None,
                 mid_block_additional_residual: jax.Array | None = None, attention_control=None):
        """down_block_additional_residuals / mid_block_additional_residual (ControlNet, as diffusers):
        one array per down-path skip (conv_in's output, then every resnet and downsampler output,
        each broadcastable to that skip's [B, h, w, C]) added to the skips, and one added to the
        mid block's output; both or neither."""
        self._check_config()
        name = type(self).__name__
        _check_sample(sample, self.in_channels, name)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise DataError(f"{name}: pass both down_block_additional_residuals and mid_block_additional_residual "
                            "(a ControlNet's two outputs), or neither.")
        out_dtype = sample.dtype
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        boc = self.block_out_channels
        n = len(boc)
        x = sample.astype(self.dtype)
        if self.center_input_sample:
            x = 2 * x - 1.0

        # per-block settings (diffusers broadcasts single values to every block)
        per = self._per_block_settings()
        rev_tlayers = (tuple(reversed(per["tlayers"])) if self.reverse_transformer_layers_per_block is None
                       else _per_block(self.reverse_transformer_layers_per_block, n,
                                       "reverse_transformer_layers_per_block", name))
        if any(isinstance(t, tuple) for t in per["tlayers"]) and self.reverse_transformer_layers_per_block is None:
            raise ConfigError(f"{name}: per-layer transformer_layers_per_block needs "
                              "reverse_transformer_layers_per_block (as diffusers requires).")

        # 1. time embedding [B, T] (+ class, + added conditions); the text context
        emb = self._embedding(timestep, sample.shape[0], class_labels, timestep_cond, added_cond_kwargs)
        ctx = jnp.asarray(encoder_hidden_states).astype(self.dtype)
        if self.encoder_hid_dim_type == "text_proj":
            ctx = nn.Dense(self._cross_attention_width(), name="encoder_hid_proj", **kw)(ctx)
        if ctx.ndim != 3:
            raise DataError(f"{name}: encoder_hidden_states must be [B, L, D], got shape {tuple(ctx.shape)}.")

        # 2. down (+ a ControlNet's residuals), 3. mid
        x, skips = self._down(self._conv_in(x), emb, ctx, encoder_attention_mask, deterministic,
                              **({} if attention_control is None else {"attention_control": attention_control}))
        if down_block_additional_residuals is not None:
            skips = _add_residuals(skips, down_block_additional_residuals, name)
        x = self._mid(x, emb, ctx, encoder_attention_mask, deterministic,
                      **({} if attention_control is None else {"attention_control": attention_control}))
        if mid_block_additional_residual is not None:
            x = x + jnp.asarray(mid_block_additional_residual).astype(x.dtype)

        # 4. up (to the skip's size when H or W is not a multiple of 2**(number of upsamplers))
        common, cross = self._block_kwargs()
        factor = 2 ** (n - 1)
        forward_size = sample.shape[1] % factor != 0 or sample.shape[2] % factor != 0
        rev = tuple(reversed(boc))
        rev_heads, rev_layers, rev_only = per["heads"][::-1], per["layers"][::-1], per["only_cross"][::-1]
        for i, kind in enumerate(self.up_block_types):
            last = i == n - 1
            k = rev_layers[i] + 1
            res, skips = skips[-k:], skips[:-k]
            size = tuple(skips[-1].shape[1:3]) if (forward_size and not last) else None
            if kind == "CrossAttnUpBlock2D":
                x = CrossAttnUpBlock2D(
                    rev[i], num_layers=k, add_upsample=not last, num_attention_heads=rev_heads[i],
                    transformer_layers_per_block=rev_tlayers[i], only_cross_attention=rev_only[i],
                    name=f"up_blocks_{i}", **cross, **common,
                )(x, res, emb, ctx, encoder_attention_mask, size, deterministic,
                  **_at(attention_control, place="up", block=i))
            else:
                x = UpBlock2D(rev[i], num_layers=k, add_upsample=not last, name=f"up_blocks_{i}", **common)(
                    x, res, emb, size, deterministic)

        # 5. out
        x = group_norm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(x)
        x = activation(self.act_fn, DIFFUSERS_ACTIVATION_NAMES, field="act_fn")(x)
        pad = (self.conv_out_kernel - 1) // 2
        x = conv2d(self.out_channels, self.conv_out_kernel, padding=pad, name="conv_out", **kw)(x)
        return x.astype(out_dtype)


def _add_residuals(skips: list, residuals: Sequence[jax.Array], owner: str) -> list:
    """skips[i] + residuals[i] for every down-path skip (diffusers' ControlNet residuals)."""
    if len(residuals) != len(skips):
        raise DataError(f"{owner}: {len(residuals)} down_block_additional_residuals for {len(skips)} down-path "
                        "skips; a ControlNet built for this U-Net's encoder gives one per skip.")
    out = []
    for i, (s, r) in enumerate(zip(skips, residuals)):
        r = jnp.asarray(r)
        if jnp.broadcast_shapes(s.shape, r.shape) != s.shape:
            raise DataError(f"{owner}: down_block_additional_residuals[{i}] has shape {tuple(r.shape)}; the skip "
                            f"it adds to is {tuple(s.shape)}.")
        out.append(s + r.astype(s.dtype))
    return out
