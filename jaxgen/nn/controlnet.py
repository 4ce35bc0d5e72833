"""A ControlNet compatible with diffusers' ``ControlNetModel`` (Stable Diffusion 1.x / 2.x layout).

A ControlNet (Zhang et al. 2023, arXiv 2302.05543) is a trainable copy of a U-Net's encoder that
reads a control image (edges, a mask, a pose, a QR pattern) and returns one residual per skip of
the frozen U-Net's down path and one for its mid block; the U-Net adds them
(``UNet2DConditionModel(..., down_block_additional_residuals=, mid_block_additional_residual=)``).

    module, params = jaxgen.load_pretrained(folder)          # a diffusers ControlNetModel folder
    out = module.apply({"params": params}, sample, t, context, control, conditioning_scale=1.0)
    down, mid = out                                           # or out.down_block_res_samples, ...
    module, params = controlnet_from_unet(unet, unet_params)  # diffusers' ControlNetModel.from_unet

Parts (submodules named after diffusers' attributes, so ``jaxgen.convert.tables`` maps the keys):

* ``controlnet_cond_embedding``: the control image [B, H, W, conditioning_channels] in [0, 1]
  (RGB; diffusers' pipeline feeds [0, 1], not [-1, 1]) through conv_in 3x3, then per
  ``conditioning_embedding_out_channels`` step a 3x3 conv and a stride-2 3x3 conv (SiLU after each),
  then conv_out 3x3 to block_out_channels[0] channels: pixel size / 2**(len - 1) (8 for the default
  four entries) must be the latent size.
* the U-Net's encoder (``jaxgen.nn.unet.CrossAttnEncoder``: time / class / added embeddings,
  conv_in, down_blocks, mid_block); the embedded control image is added to conv_in's output.
* ``controlnet_down_blocks_i`` (one 1x1 conv per down-path skip) and ``controlnet_mid_block``
  (1x1): the "zero convolutions", zero at ``from_unet`` initialisation.

Then every residual is multiplied by ``conditioning_scale``; with ``guess_mode`` by
``conditioning_scale * 10**linspace(-1, 0, K + 1)`` instead (0.1 for the first skip up to 1 for
the mid block; K skips), unless ``global_pool_conditions``, which averages every residual over
H and W ([B, 1, 1, C], broadcast when added).

Deliberate differences: configs diffusers accepts but does not run as its U-Net would are refused
(ConfigError naming the field): ``encoder_hid_dim`` / ``encoder_hid_dim_type`` (diffusers'
ControlNet creates ``encoder_hid_proj`` and never applies it), ``addition_embed_type`` "text" and
"text_image", ``class_embed_type`` "simple_projection" (diffusers has none for the ControlNet),
``mid_block_type`` None. No attention masks (diffusers' ControlNet passes no
encoder_attention_mask to its blocks either) and no ``timestep_cond``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.config import all_in, is_int
from jaxgen.convert.pretrained import Pretrained
from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.activations import DIFFUSERS_ACTIVATION_NAMES
from jaxgen.nn.attention import IMPLEMENTATIONS
from jaxgen.nn.layers import conv2d
from jaxgen.nn.unet import CrossAttnEncoder, UNet2DConditionModel

Dtype = Any

# the U-Net encoder's parameters a ControlNet copies in from_unet (top-level names in both trees)
ENCODER_PARAMS = ("conv_in", "time_embedding", "class_embedding", "add_embedding", "down_blocks_", "mid_block")


@flax.struct.dataclass
class ControlNetOutput:
    """A ControlNet's residuals (a pytree). Unpacks and indexes like diffusers' return_dict=False
    tuple: ``down, mid = out``, ``out[0]``.

    down_block_res_samples: one [B, h, w, C] per down-path skip of the U-Net, in order (conv_in's
        output, then every resnet and downsampler output; [B, 1, 1, C] with global_pool_conditions);
    mid_block_res_sample: [B, h, w, C_last] (or [B, 1, 1, C_last]).
    """

    down_block_res_samples: tuple
    mid_block_res_sample: jax.Array

    def __iter__(self):
        return iter((self.down_block_res_samples, self.mid_block_res_sample))

    def __getitem__(self, i):
        return (self.down_block_res_samples, self.mid_block_res_sample)[i]

    def __add__(self, other: "ControlNetOutput") -> "ControlNetOutput":
        """The sum of two ControlNets' residuals (diffusers' MultiControlNetModel)."""
        return ControlNetOutput(tuple(a + b for a, b in zip(self.down_block_res_samples,
                                                            other.down_block_res_samples)),
                                self.mid_block_res_sample + other.mid_block_res_sample)


class ControlNetConditioningEmbedding(nn.Module):
    """diffusers' ``ControlNetConditioningEmbedding``: control image -> latent-size features.

    x: [B, H, W, C_cond] -> [B, H / 2**(k-1), W / 2**(k-1), conditioning_embedding_channels]
    (k = len(block_out_channels); each stride-2 conv halves the size, rounding up).
    """

    conditioning_embedding_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        boc = self.block_out_channels
        x = jax.nn.silu(conv2d(boc[0], 3, name="conv_in", **kw)(x))
        for i in range(len(boc) - 1):
            x = jax.nn.silu(conv2d(boc[i], 3, name=f"blocks_{2 * i}", **kw)(x))
            x = jax.nn.silu(conv2d(boc[i + 1], 3, stride=2, name=f"blocks_{2 * i + 1}", **kw)(x))
        return conv2d(self.conditioning_embedding_channels, 3, name="conv_out", **kw)(x)


def _channel_tuple(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(is_int(v) and v > 0 for v in value)


class ControlNetModel(nn.Module, CrossAttnEncoder, Pretrained):
    """diffusers' ``ControlNetModel``.

    apply({"params": p}, sample, timestep, encoder_hidden_states, controlnet_cond,
          conditioning_scale=1.0, guess_mode=False, *, class_labels=None, added_cond_kwargs=None,
          deterministic=True) -> ControlNetOutput (down_block_res_samples, mid_block_res_sample)
      sample: [B, h, w, in_channels] latents (the U-Net's scaled input);
      timestep: scalar, [1] or [B]; encoder_hidden_states: [B, L, cross_attention_dim];
      controlnet_cond: [B, h * f, w * f, conditioning_channels] float in [0, 1], channels in
      ``controlnet_conditioning_channel_order`` ("rgb"; "bgr" flips them), f =
      2**(len(conditioning_embedding_out_channels) - 1);
      conditioning_scale: float or a traced [] array; guess_mode: Python bool;
      class_labels, added_cond_kwargs: as UNet2DConditionModel's.
    Residuals come back in the sample's dtype. attention_head_dim is the NUMBER OF HEADS, as in
    UNet2DConditionModel (num_attention_heads, when set, wins).
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: Any = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    # UNet2DConditionModel options diffusers' ControlNetModel does not have: fixed here (class
    # constants, not config fields) so the shared encoder (CrossAttnEncoder) reads them.
    time_embedding_type: ClassVar[str] = "positional"
    time_embedding_dim: ClassVar[None] = None
    timestep_post_act: ClassVar[None] = None
    time_cond_proj_dim: ClassVar[None] = None
    time_embedding_act_fn: ClassVar[None] = None
    class_embeddings_concat: ClassVar[bool] = False
    conv_in_kernel: ClassVar[int] = 3
    dropout: ClassVar[float] = 0.0

    pt_library: ClassVar[str] = "diffusers"
    pt_weights_name: ClassVar[str] = "diffusion_pytorch_model"
    # addition_embed_type_num_heads only reaches addition_embed_type="text": any value is fine.
    pt_supported: ClassVar[Mapping[str, Any]] = {
        "down_block_types": all_in(("CrossAttnDownBlock2D", "DownBlock2D")),
        "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"),
        "class_embed_type": ("timestep", "identity", "projection"),
        "addition_embed_type": ("text_time",),
        "encoder_hid_dim": lambda v: False,        # diffusers' ControlNet never applies encoder_hid_proj
        "encoder_hid_dim_type": lambda v: False,
        "resnet_time_scale_shift": ("default", "scale_shift"),
        "act_fn": DIFFUSERS_ACTIVATION_NAMES,
        "norm_num_groups": is_int,
        "layers_per_block": is_int,
        "cross_attention_dim": is_int,
        "controlnet_conditioning_channel_order": ("rgb", "bgr"),
        "conditioning_embedding_out_channels": _channel_tuple,
    }

    def _class_timestep_act(self) -> str:
        return "silu"      # diffusers' ControlNet builds this TimestepEmbedding with its default act

    @property
    def downscale_factor(self) -> int:
        """Control image pixels per latent pixel: 2**(len(conditioning_embedding_out_channels) - 1)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def num_residuals(self) -> int:
        """How many down-path residuals the ControlNet returns (the U-Net's skips)."""
        n = len(self.block_out_channels)
        return 1 + n * self.layers_per_block + (n - 1)

    # -- config -----------------------------------------------------------------------------
    def _check_config(self) -> None:
        name = type(self).__name__
        self.check_supported()
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n:
            raise ConfigError(f"{name}: down_block_types ({len(self.down_block_types)}) and block_out_channels "
                              f"({n}) must have the same length.")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ConfigError(f"{name}: attention_impl={self.attention_impl!r}; choose one of {IMPLEMENTATIONS}.")
        if self.class_embed_type == "projection" and self.projection_class_embeddings_input_dim is None:
            raise ConfigError(f"{name}: class_embed_type='projection' needs projection_class_embeddings_input_dim.")
        if self.addition_embed_type == "text_time" and (self.addition_time_embed_dim is None or
                                                        self.projection_class_embeddings_input_dim is None):
            raise ConfigError(f"{name}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim.")

    def dummy_inputs(self):
        s = 2 ** (len(self.block_out_channels) - 1)
        f = self.downscale_factor
        sample = jnp.zeros((1, s, s, self.in_channels), jnp.float32)
        ctx = jnp.zeros((1, 1, self.cross_attention_dim), jnp.float32)
        cond = jnp.zeros((1, s * f, s * f, self.conditioning_channels), jnp.float32)
        return (sample, jnp.ones((1,), jnp.float32), ctx, cond), self._dummy_conditions()

    # -- forward ----------------------------------------------------------------------------
    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 guess_mode: bool = False, *, class_labels=None,
                 added_cond_kwargs: Mapping[str, jax.Array] | None = None,
                 deterministic: bool = True) -> ControlNetOutput:
        self._check_config()
        name = type(self).__name__
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise DataError(f"{name}: sample must be NHWC [B, h, w, {self.in_channels}], got shape "
                            f"{tuple(sample.shape)}.")
        cond = jnp.asarray(controlnet_cond)
        f = self.downscale_factor
        want = (sample.shape[0], sample.shape[1] * f, sample.shape[2] * f, self.conditioning_channels)
        if cond.ndim != 4 or cond.shape[-1] != self.conditioning_channels:
            raise DataError(f"{name}: controlnet_cond must be NHWC [B, H, W, {self.conditioning_channels}] "
                            f"(float in [0, 1]), got shape {tuple(cond.shape)}; transpose NCHW arrays with "
                            "x.transpose(0, 2, 3, 1).")
        if tuple(cond.shape) != want:
            raise DataError(f"{name}: controlnet_cond has shape {tuple(cond.shape)}; with sample "
                            f"{tuple(sample.shape)} it must be {want} (pixel size = latent size x {f}).")
        out_dtype = sample.dtype
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        ctx = jnp.asarray(encoder_hidden_states).astype(self.dtype)
        if ctx.ndim != 3:
            raise DataError(f"{name}: encoder_hidden_states must be [B, L, D], got shape {tuple(ctx.shape)}.")

        emb = self._embedding(timestep, sample.shape[0], class_labels, None, added_cond_kwargs)
        x = self._conv_in(sample.astype(self.dtype))
        x = x + ControlNetConditioningEmbedding(self.block_out_channels[0], self.conditioning_embedding_out_channels,
                                                name="controlnet_cond_embedding", **kw)(cond.astype(self.dtype))
        x, skips = self._down(x, emb, ctx, None, deterministic)
        x = self._mid(x, emb, ctx, None, deterministic)

        down = [conv2d(s.shape[-1], 1, padding=0, name=f"controlnet_down_blocks_{i}", **kw)(s)
                for i, s in enumerate(skips)]
        mid = conv2d(x.shape[-1], 1, padding=0, name="controlnet_mid_block", **kw)(x)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if guess_mode and not self.global_pool_conditions:
            # 0.1 for the first skip to 1.0 for the mid block, as torch.logspace(-1, 0, K + 1)
            scales = jnp.asarray(np.logspace(-1, 0, len(down) + 1).astype(np.float32)) * scale
            down = [d * scales[i].astype(d.dtype) for i, d in enumerate(down)]
            mid = mid * scales[-1].astype(mid.dtype)
        else:
            down = [d * scale.astype(d.dtype) for d in down]
            mid = mid * scale.astype(mid.dtype)
        if self.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return ControlNetOutput(tuple(d.astype(out_dtype) for d in down), mid.astype(out_dtype))


# ------------------------------------------------------------------------------------------------
# from_unet
# ------------------------------------------------------------------------------------------------
# UNet2DConditionModel fields a ControlNet copies (diffusers' from_unet), and the U-Net settings
# it cannot carry: field -> the value the ControlNet implies.
_FROM_UNET = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
              "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
              "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
              "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention",
              "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
              "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim")
_UNET_ONLY = {"time_embedding_type": "positional", "time_embedding_dim": None, "timestep_post_act": None,
              "time_cond_proj_dim": None, "time_embedding_act_fn": None, "class_embeddings_concat": False,
              "conv_in_kernel": 3, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
              "center_input_sample": False}


def _torch_default_convs(key: jax.Array | int, kernel_shapes: dict[str, tuple[int, ...]]) -> dict:
    """PyTorch's default Conv2d initialisation (kaiming_uniform(a=sqrt(5)): weight and bias
    ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))) for each name -> Flax kernel shape [kh, kw, in, out].
    Drawn on the host by NumPy, seeded by the key's data (or the int): nothing to compile."""
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist() if isinstance(key, jax.Array) else int(key)
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in kernel_shapes.items():
        bound = 1.0 / np.sqrt(np.prod(shape[:3]))
        out[name] = {"kernel": rng.uniform(-bound, bound, shape).astype(np.float32),
                     "bias": rng.uniform(-bound, bound, shape[-1:]).astype(np.float32)}
    return out


def controlnet_from_unet(unet: UNet2DConditionModel, unet_params: Mapping[str, Any], *,
                         controlnet_conditioning_channel_order: str = "rgb",
                         conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                         load_weights_from_unet: bool = True, conditioning_channels: int = 3,
                         key: jax.Array | int = 0) -> tuple[ControlNetModel, dict]:
    """diffusers' ``ControlNetModel.from_unet(unet)``: a ControlNet with the U-Net's encoder.

    unet, unet_params: a UNet2DConditionModel and its ``params`` tree.
    Returns (module, params): the config fields diffusers copies from the U-Net (attention_impl,
    dtype and param_dtype too); with load_weights_from_unet, conv_in, time_embedding,
    class_embedding, add_embedding, down_blocks and mid_block are the U-Net's arrays; every zero
    convolution (controlnet_down_blocks_i, controlnet_mid_block) and the conditioning embedding's
    conv_out are zero; the conditioning embedding's conv_in and blocks are drawn from ``key`` (a
    typed key or an int seed) as PyTorch initialises a Conv2d (uniform in +-1/sqrt(fan_in),
    weights and biases); without load_weights_from_unet the encoder is module.init's, from
    fold_in(key, 1). U-Net settings a diffusers ControlNet cannot represent (e.g. fourier time features,
    encoder_hid_dim, per-block layers_per_block) are a ConfigError naming the field.
    """
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"controlnet_from_unet takes a UNet2DConditionModel, got {type(unet).__name__}.")
    for field, value in _UNET_ONLY.items():
        if getattr(unet, field) != value:
            raise ConfigError(f"controlnet_from_unet: the U-Net has {field}={getattr(unet, field)!r}; diffusers' "
                              f"ControlNetModel has no such option (it implies {value!r}).")
    cfg = {f: getattr(unet, f) for f in _FROM_UNET}
    if not is_int(cfg["layers_per_block"]):
        raise ConfigError(f"controlnet_from_unet: the U-Net has layers_per_block={cfg['layers_per_block']!r}; "
                          "diffusers' ControlNetModel takes one int for every block.")
    if not is_int(cfg["cross_attention_dim"]):
        cfg["cross_attention_dim"] = unet._cross_attention_width()
    module = ControlNetModel(**cfg, controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
                             conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                             conditioning_channels=conditioning_channels, attention_impl=unet.attention_impl,
                             dtype=unet.dtype, param_dtype=unet.param_dtype)
    abstract = module.abstract_params()
    params: dict[str, Any] = {}
    for name, sub in abstract.items():
        if name.startswith(ENCODER_PARAMS):
            if load_weights_from_unet:
                params[name] = unet_params[name]
            continue
        params[name] = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), sub)
    # the encoder weights when not copied, and the conditioning embedding's first convolutions
    if not load_weights_from_unet:
        args, kwargs = module.dummy_inputs()
        k_enc = jax.random.fold_in(key if isinstance(key, jax.Array) else jax.random.key(key), 1)
        fresh = jax.jit(module.init)(k_enc, *args, **kwargs)["params"]
        params.update({k: v for k, v in fresh.items() if k.startswith(ENCODER_PARAMS)})
    emb = abstract["controlnet_cond_embedding"]
    shapes = {n: tuple(emb[n]["kernel"].shape) for n in sorted(emb) if n != "conv_out"}
    params["controlnet_cond_embedding"] = {**params["controlnet_cond_embedding"], **_torch_default_convs(key, shapes)}
    return module, jax.tree_util.tree_map(lambda a, s: jnp.asarray(a, s.dtype), params, abstract)
