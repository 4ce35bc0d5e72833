"""CLIP: the text transformer, the vision transformer and the two-tower model, exact against
transformers' CLIPTextModel[WithProjection], CLIPVisionModel[WithProjection] and CLIPModel.

Layouts: token ids ``[B, L]`` int (L <= max_position_embeddings); ``pixel_values`` NHWC
``[B, H, W, C]`` float, normalised as CLIP's image processor does (see ``clip_pixel_values``);
hidden states ``[B, L, D]``.

Weights: submodules are named after transformers' attributes, so the folders transformers writes
map by rule (``jaxgen.convert.tables``): ``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.0.self_attn.q_proj.weight``, ``vision_model.pre_layrnorm.weight``,
``text_projection.weight``, ``logit_scale``, ... jaxgen writes single-tower folders with the
``text_model.`` / ``vision_model.`` prefix (the layout of Stable Diffusion repos and of
transformers 4, which transformers 5 also reads) and reads both that and transformers 5's
unprefixed single-tower layout.

Precision: ``dtype`` is the computation dtype (float32 default; bfloat16 for speed), parameters
stay ``param_dtype`` (float32). Layer norms and the attention softmax reduce in float32; the
two-tower logits are computed in float32. ``attention_impl`` picks the attention kernel
(``jaxgen.nn.attention``: "xla", "cudnn", "auto"). ``scan_layers=True`` runs the encoder layers as
one ``lax.scan`` over their stacked weights, so XLA compiles one layer body instead of
``num_hidden_layers`` copies (same results; the parameters keep transformers' per-layer names
``layers_<i>``, stacked only inside the program; docs/PERFORMANCE.md measures when it pays). None
of these is part of config.json: set them on the module, e.g. ``module.clone(dtype=jnp.bfloat16,
scan_layers=True)`` after ``jaxgen.load_pretrained``.

Dropout: none is applied (transformers' CLIP uses only attention dropout, 0.0 in every released
config); a config with ``attention_dropout > 0`` loads with a warning saying so.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.config import filter_config, is_int, module_fields
from jaxgen.convert.pretrained import TRANSFORMERS_VERSION, Pretrained
from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.activations import activation
from jaxgen.nn.attention import IMPLEMENTATIONS, dot_product_attention

Dtype = Any

# CLIP's image normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), per RGB channel.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# the transformers ACT2FN names jaxgen's CLIP accepts as hidden_act (jaxgen.nn.activations holds
# the functions: "gelu" is the exact erf GELU, "gelu_new" / "gelu_pytorch_tanh" the tanh form)
CLIP_ACTIVATION_NAMES = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")

# Fields every transformers PretrainedConfig may carry that say nothing about the architecture;
# they are dropped quietly when reading a config.json (other unknown fields get a warning).
_GENERIC_HF_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "finetuning_task", "id2label", "label2id",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "problem_type", "name_or_path", "dropout", "attn_implementation", "gradient_checkpointing",
    "text_config_dict", "vision_config_dict", "use_cache",
})
# Module fields that are runtime choices, not architecture: never read from or written to config.json.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "scan_layers")


_COMMON_SUPPORTED = {
    "hidden_act": CLIP_ACTIVATION_NAMES,
    "hidden_size": is_int,
    "intermediate_size": is_int,
    "num_hidden_layers": is_int,
    "num_attention_heads": is_int,
    "projection_dim": is_int,
}
TEXT_SUPPORTED = {**_COMMON_SUPPORTED, "vocab_size": is_int, "max_position_embeddings": is_int,
                  "eos_token_id": is_int}
VISION_SUPPORTED = {**_COMMON_SUPPORTED, "image_size": is_int, "patch_size": is_int,
                    "num_channels": is_int}


def _clean_hf_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _GENERIC_HF_KEYS}


def _warn_dropout(owner: str, kwargs: Mapping[str, Any]) -> None:
    if kwargs.get("attention_dropout", 0.0):
        warnings.warn(f"{owner}: attention_dropout={kwargs['attention_dropout']} is kept in the config "
                      "but jaxgen's CLIP applies no dropout (outputs equal transformers in eval mode).",
                      stacklevel=3)


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class CLIPTextOutput:
    """Output of the text towers.

    last_hidden_state: [B, L, D] after the final layer norm.
    pooler_output:     [B, D], the hidden state at each sequence's end token.
    text_embeds:       [B, P], the projected pooler_output (WithProjection only; else None).
    """
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    text_embeds: jax.Array | None = None


@flax.struct.dataclass
class CLIPVisionOutput:
    """Output of the vision towers.

    last_hidden_state: [B, 1 + N, D] (class token first, N patches), before the post layer norm.
    pooler_output:     [B, D], the post-layer-normed class token.
    image_embeds:      [B, P], the projected pooler_output (WithProjection only; else None).
    """
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    image_embeds: jax.Array | None = None


@flax.struct.dataclass
class CLIPOutput:
    """Output of CLIPModel.

    logits_per_image: [B_img, B_txt] float32 = exp(logit_scale) * cosine similarity.
    logits_per_text:  [B_txt, B_img], its transpose.
    text_embeds:      [B_txt, P] float32, L2-normalised projected text features.
    image_embeds:     [B_img, P] float32, L2-normalised projected image features.
    text_model_output / vision_model_output: the towers' outputs (unprojected).
    """
    logits_per_image: jax.Array
    logits_per_text: jax.Array
    text_embeds: jax.Array
    image_embeds: jax.Array
    text_model_output: CLIPTextOutput
    vision_model_output: CLIPVisionOutput


# ------------------------------------------------------------------------------------------------
# blocks
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TowerSpec:
    """The shape of one transformer tower (shared by the text and vision encoders); hashable."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float
    initializer_factor: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    scan_layers: bool = False

    def check(self, owner: str) -> None:
        activation(self.hidden_act, CLIP_ACTIVATION_NAMES, field="hidden_act", owner=owner)  # or ConfigError
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{owner}: hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}.")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ConfigError(f"{owner}: attention_impl={self.attention_impl!r}; choose one of "
                              f"{IMPLEMENTATIONS}.")


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def _layer_norm(spec: TowerSpec, name: str | None = None) -> nn.LayerNorm:
    """torch.nn.LayerNorm(D, eps=layer_norm_eps): two-pass variance, float32 statistics."""
    return nn.LayerNorm(epsilon=spec.layer_norm_eps, use_fast_variance=False, dtype=spec.dtype,
                        param_dtype=spec.param_dtype, name=name)


def _dense(spec: TowerSpec, features: int, std: float, *, use_bias: bool = True,
           name: str | None = None) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, kernel_init=_normal(std), dtype=spec.dtype,
                    param_dtype=spec.param_dtype, name=name)


class CLIPAttention(nn.Module):
    """Multi-head self-attention: q/k/v/out projections with bias, scale head_dim**-0.5."""
    spec: TowerSpec

    def setup(self):
        s = self.spec
        d, f = s.hidden_size, s.initializer_factor
        in_std = d**-0.5 * (2 * s.num_hidden_layers) ** -0.5 * f
        self.q_proj = _dense(s, d, in_std)
        self.k_proj = _dense(s, d, in_std)
        self.v_proj = _dense(s, d, in_std)
        self.out_proj = _dense(s, d, d**-0.5 * f)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D]; mask: bool broadcastable to [B, H, L, L], True = attend. Returns [B, L, D]."""
        b, length, d = x.shape
        heads = self.spec.num_attention_heads
        split = lambda t: t.reshape(b, length, heads, d // heads)  # [B, L, D] -> [B, L, H, Dh]
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                    mask=mask, implementation=self.spec.attention_impl)
        return self.out_proj(out.reshape(b, length, d))  # [B, L, H, Dh] -> [B, L, D]


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""
    spec: TowerSpec

    def setup(self):
        s = self.spec
        d, f = s.hidden_size, s.initializer_factor
        self.fc1 = _dense(s, s.intermediate_size, (2 * d) ** -0.5 * f)
        self.fc2 = _dense(s, d, d**-0.5 * (2 * s.num_hidden_layers) ** -0.5 * f)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.spec.hidden_act, CLIP_ACTIVATION_NAMES, field="hidden_act")
        return self.fc2(act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x))."""
    spec: TowerSpec

    def setup(self):
        self.self_attn = CLIPAttention(self.spec)
        self.layer_norm1 = _layer_norm(self.spec)
        self.mlp = CLIPMLP(self.spec)
        self.layer_norm2 = _layer_norm(self.spec)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` encoder layers (PyTorch keys ``layers.<i>.*``)."""
    spec: TowerSpec

    def setup(self):
        self.layers = [CLIPEncoderLayer(self.spec) for _ in range(self.spec.num_hidden_layers)]

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class _ScanEncoderLayer(CLIPEncoderLayer):
    """CLIPEncoderLayer with the (carry, output) signature of ``nn.scan``."""

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, None]:
        return super().__call__(x, mask), None


class _StackedLayers(nn.Module):
    """The encoder's layers as one ``nn.scan`` over weights stacked on a leading layer axis
    (params {"layers": {... [N, ...]}}); ``ScannedCLIPEncoder`` gives them per-layer names."""
    spec: TowerSpec

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        scan = nn.scan(_ScanEncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast,), length=self.spec.num_hidden_layers)
        return scan(self.spec, name="layers")(x, mask)[0]


def _stack_layers(collections: Mapping[str, Any]) -> dict[str, Any]:
    """{"params": {"layers_0": t0, ..., "layers_<N-1>": t(N-1)}} -> {"params": {"layers": stacked}}."""
    params = collections.get("params") or {}
    if not params:           # initialisation: nothing stored yet
        return dict(collections)
    n = len(params)
    missing = [f"layers_{i}" for i in range(n) if f"layers_{i}" not in params]
    if missing:
        raise ConfigError(f"CLIP encoder with scan_layers=True: expected the parameters layers_0 .. "
                          f"layers_{n - 1}, missing {missing}; the weights do not fit this model.")
    layers = [params[f"layers_{i}"] for i in range(n)]
    return {**collections, "params": {"layers": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)}}


def _unstack_layers(collections: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of _stack_layers (what initialisation stores: transformers' per-layer names)."""
    params = collections.get("params") or {}
    if not params:
        return dict(collections)
    stacked = params["layers"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return {**collections, "params": {f"layers_{i}": jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
                                      for i in range(n)}}


# CLIPEncoder's parameter tree (layers_<i>), run as one scan over the stacked layers
ScannedCLIPEncoder = nn.map_variables(_StackedLayers, "params", trans_in_fn=_stack_layers,
                                      trans_out_fn=_unstack_layers, init=True)


def clip_encoder(spec: TowerSpec) -> nn.Module:
    """The encoder of a tower: ScannedCLIPEncoder with spec.scan_layers (and more than one layer),
    else CLIPEncoder; both have the same parameters and outputs."""
    if spec.scan_layers and spec.num_hidden_layers > 1:
        return ScannedCLIPEncoder(spec)
    return CLIPEncoder(spec)


class CLIPTextEmbeddings(nn.Module):
    spec: TowerSpec
    vocab_size: int
    max_position_embeddings: int

    def setup(self):
        s, std = self.spec, 0.02 * self.spec.initializer_factor
        self.token_embedding = nn.Embed(self.vocab_size, s.hidden_size, embedding_init=_normal(std),
                                        dtype=s.dtype, param_dtype=s.param_dtype)
        self.position_embedding = nn.Embed(self.max_position_embeddings, s.hidden_size,
                                           embedding_init=_normal(std), dtype=s.dtype,
                                           param_dtype=s.param_dtype)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, L] int -> [B, L, D] (token + position embeddings)."""
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(input_ids.shape[1]))


class CLIPTextTransformer(nn.Module):
    """Embeddings, causal pre-LN encoder, final layer norm, pooling at the end token."""
    spec: TowerSpec
    vocab_size: int
    max_position_embeddings: int
    eos_token_id: int

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.spec, self.vocab_size, self.max_position_embeddings)
        self.encoder = clip_encoder(self.spec)
        self.final_layer_norm = _layer_norm(self.spec)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise DataError(f"CLIP text model: input_ids must be integer [B, L], got {input_ids.dtype} "
                            f"{tuple(input_ids.shape)}.")
        length = input_ids.shape[1]
        if length > self.max_position_embeddings:
            raise DataError(f"CLIP text model: sequence length {length} exceeds max_position_embeddings="
                            f"{self.max_position_embeddings}; tokenize with max_length <= that.")
        input_ids = input_ids.astype(jnp.int32)
        h = self.embeddings(input_ids)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]       # [1, 1, L, L] causal
        if attention_mask is not None:
            keep = jnp.asarray(attention_mask).astype(bool)                  # [B, L], 1 = real token
            mask = mask & keep[:, None, None, :]                             # [B, 1, L, L]
        h = self.final_layer_norm(self.encoder(h, mask))
        if self.eos_token_id == 2:
            # transformers' legacy rule for configs written before eos_token_id was fixed:
            # the end token has the largest id of CLIP's vocabulary.
            where = jnp.argmax(input_ids, axis=-1)
        else:  # first occurrence of the end token (padding may repeat it)
            where = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(h, where[:, None, None], axis=1)[:, 0]   # [B, D]
        return CLIPTextOutput(last_hidden_state=h, pooler_output=pooled)


class CLIPVisionEmbeddings(nn.Module):
    spec: TowerSpec
    image_size: int
    patch_size: int
    initializer_range: float

    def setup(self):
        s, f, p = self.spec, self.spec.initializer_factor, self.patch_size
        self.class_embedding = self.param("class_embedding", _normal(s.hidden_size**-0.5 * f),
                                          (s.hidden_size,), s.param_dtype)
        self.patch_embedding = nn.Conv(s.hidden_size, (p, p), strides=(p, p), padding="VALID",
                                       use_bias=False, kernel_init=_normal(self.initializer_range * f),
                                       dtype=s.dtype, param_dtype=s.param_dtype)
        num_positions = (self.image_size // p) ** 2 + 1
        self.position_embedding = nn.Embed(num_positions, s.hidden_size,
                                           embedding_init=_normal(self.initializer_range * f),
                                           dtype=s.dtype, param_dtype=s.param_dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: [B, H, W, C] -> [B, 1 + (H/p)*(W/p), D] (class token, then patches row-major)."""
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.astype(self.spec.dtype))   # [B, H/p, W/p, D]
        patches = patches.reshape(b, -1, self.spec.hidden_size)               # [B, N, D]
        cls = jnp.broadcast_to(self.class_embedding.astype(patches.dtype), (b, 1, self.spec.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)                           # [B, 1 + N, D]
        return x + self.position_embedding(jnp.arange(x.shape[1]))


class CLIPVisionTransformer(nn.Module):
    """Patch embeddings + class token, pre-layernorm, encoder, post-layernorm on the class token."""
    spec: TowerSpec
    image_size: int
    patch_size: int
    num_channels: int
    initializer_range: float

    def setup(self):
        self.embeddings = CLIPVisionEmbeddings(self.spec, self.image_size, self.patch_size,
                                               self.initializer_range)
        self.pre_layrnorm = _layer_norm(self.spec)   # transformers' spelling
        self.encoder = clip_encoder(self.spec)
        self.post_layernorm = _layer_norm(self.spec)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        pixel_values = jnp.asarray(pixel_values)
        want = (self.image_size, self.image_size, self.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise DataError(f"CLIP vision model: pixel_values must be NHWC [B, {want[0]}, {want[1]}, "
                            f"{want[2]}], got {tuple(pixel_values.shape)}. Resize to image_size and "
                            "put channels last (see jaxgen.nn.clip.clip_pixel_values).")
        h = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return CLIPVisionOutput(last_hidden_state=h, pooler_output=self.post_layernorm(h[:, 0]))


# ------------------------------------------------------------------------------------------------
# convertible models
# ------------------------------------------------------------------------------------------------
class _CLIPPretrained(Pretrained):
    """Shared config handling of the CLIP classes (transformers layout, runtime fields excluded)."""

    pt_library = "transformers"
    pt_weights_name = "model"
    pt_ignore = (r"(^|\.)position_ids$",)
    pt_model_type = ""

    @classmethod
    def _arch_fields(cls) -> dict[str, Any]:
        return {k: v for k, v in module_fields(cls).items() if k not in _RUNTIME_FIELDS}

    @classmethod
    def from_pt_config(cls, cfg: Mapping[str, Any]):
        """The module described by a transformers config dict; unknown fields warn, runtime
        fields (dtype, attention_impl) keep their defaults."""
        kwargs = filter_config(_clean_hf_config(cfg), cls._arch_fields(), owner=cls.__name__,
                               supported=cls.pt_supported, aliases=cls.pt_aliases)
        _warn_dropout(cls.__name__, kwargs)
        return cls(**kwargs)

    def _runtime(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _RUNTIME_FIELDS}

    def pt_config(self) -> dict[str, Any]:
        """config.json as transformers writes it for this class."""
        fields = {k: getattr(self, k) for k in self._arch_fields()}
        return {"architectures": [self.pt_class_name()], "model_type": self.pt_model_type, **fields,
                "transformers_version": TRANSFORMERS_VERSION}


def _with_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Single-tower weights written by transformers 5 lack the tower prefix: add it."""
    if any(k.startswith(prefix + ".") for k in state_dict):
        return dict(state_dict)
    return {f"{prefix}.{k}": v for k, v in state_dict.items()}


def _spec(fields: Mapping[str, Any], runtime: Mapping[str, Any], owner: str) -> TowerSpec:
    spec = TowerSpec(fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"],
                     fields["num_attention_heads"], fields["hidden_act"], fields["layer_norm_eps"],
                     fields["initializer_factor"], **runtime)
    spec.check(owner)
    return spec


def _text_transformer(fields: Mapping[str, Any], runtime: Mapping[str, Any], owner: str,
                      ) -> CLIPTextTransformer:
    """The text tower from CLIPTextConfig fields and the runtime fields (call inside setup)."""
    return CLIPTextTransformer(_spec(fields, runtime, owner), fields["vocab_size"],
                               fields["max_position_embeddings"], fields["eos_token_id"])


def _vision_transformer(fields: Mapping[str, Any], runtime: Mapping[str, Any], owner: str,
                        ) -> CLIPVisionTransformer:
    """The vision tower from CLIPVisionConfig fields and the runtime fields (call inside setup)."""
    if fields["image_size"] % fields["patch_size"]:
        raise ConfigError(f"{owner}: image_size={fields['image_size']} is not a multiple of "
                          f"patch_size={fields['patch_size']}.")
    return CLIPVisionTransformer(_spec(fields, runtime, owner), fields["image_size"], fields["patch_size"],
                                 fields["num_channels"], fields["initializer_range"])


class _CLIPTextBase(nn.Module, _CLIPPretrained):
    """Fields of transformers' CLIPTextConfig, plus the runtime fields dtype, param_dtype,
    attention_impl and scan_layers (not written to config.json)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    scan_layers: bool = False

    pt_supported = TEXT_SUPPORTED
    pt_model_type = "clip_text_model"

    def _text_transformer(self) -> CLIPTextTransformer:
        return _text_transformer({k: getattr(self, k) for k in self._arch_fields()}, self._runtime(),
                                 type(self).__name__)

    def dummy_inputs(self):
        return (jnp.zeros((1, self.max_position_embeddings), jnp.int32),), {}

    def params_from_state_dict(self, state_dict, dtype=np.float32):
        return super().params_from_state_dict(_with_prefix(state_dict, "text_model"), dtype=dtype)


class CLIPTextModel(_CLIPTextBase):
    """transformers' CLIPTextModel (Stable Diffusion's text encoder).

    apply({"params": p}, input_ids [B, L] int, attention_mask=None [B, L] {0,1})
      -> CLIPTextOutput(last_hidden_state [B, L, D], pooler_output [B, D]) in ``dtype``.
    Causal self-attention; attention_mask additionally hides padding keys. Pooling takes the
    hidden state at the first ``eos_token_id`` (or, for legacy configs with eos_token_id == 2,
    at the largest id).
    """

    def setup(self):
        self.text_model = self._text_transformer()

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask)


class CLIPTextModelWithProjection(_CLIPTextBase):
    """transformers' CLIPTextModelWithProjection (SDXL's second text encoder).

    apply(v, input_ids [B, L], attention_mask=None) -> CLIPTextOutput with text_embeds [B, P]
    (P = projection_dim; text_projection has no bias; text_embeds are not normalised).
    """

    def setup(self):
        self.text_model = self._text_transformer()
        std = self.hidden_size**-0.5 * self.initializer_factor
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False, kernel_init=_normal(std),
                                        dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask)
        return out.replace(text_embeds=self.text_projection(out.pooler_output))


class _CLIPVisionBase(nn.Module, _CLIPPretrained):
    """Fields of transformers' CLIPVisionConfig, plus the runtime fields dtype, param_dtype,
    attention_impl and scan_layers (not written to config.json)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    scan_layers: bool = False

    pt_supported = VISION_SUPPORTED
    pt_model_type = "clip_vision_model"

    def _vision_transformer(self) -> CLIPVisionTransformer:
        return _vision_transformer({k: getattr(self, k) for k in self._arch_fields()}, self._runtime(),
                                   type(self).__name__)

    def dummy_inputs(self):
        return (jnp.zeros((1, self.image_size, self.image_size, self.num_channels), jnp.float32),), {}

    def params_from_state_dict(self, state_dict, dtype=np.float32):
        return super().params_from_state_dict(_with_prefix(state_dict, "vision_model"), dtype=dtype)


class CLIPVisionModel(_CLIPVisionBase):
    """transformers' CLIPVisionModel.

    apply({"params": p}, pixel_values [B, H, W, C] float, NHWC, CLIP-normalised)
      -> CLIPVisionOutput(last_hidden_state [B, 1 + N, D], pooler_output [B, D]).
    H = W = image_size; N = (image_size / patch_size)**2.
    """

    def setup(self):
        self.vision_model = self._vision_transformer()

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        return self.vision_model(pixel_values)


class CLIPVisionModelWithProjection(_CLIPVisionBase):
    """transformers' CLIPVisionModelWithProjection.

    apply(v, pixel_values [B, H, W, C]) -> CLIPVisionOutput with image_embeds [B, P] (not normalised).
    """

    def setup(self):
        self.vision_model = self._vision_transformer()
        std = self.hidden_size**-0.5 * self.initializer_factor
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, kernel_init=_normal(std),
                                          dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        out = self.vision_model(pixel_values)
        return out.replace(image_embeds=self.visual_projection(out.pooler_output))


def _tower_config(cls, cfg: Mapping[str, Any] | None, owner: str, *, tolerant: bool) -> dict[str, Any]:
    """A sub-config dict -> the full field dict of ``cls`` (defaults filled in).

    tolerant: read a transformers dict (unknown fields warn); otherwise unknown fields are errors.
    """
    fields = cls._arch_fields()
    cfg = dict(cfg or {})
    if tolerant:
        kwargs = filter_config(_clean_hf_config(cfg), fields, owner=owner, supported=cls.pt_supported)
        _warn_dropout(owner, kwargs)
    else:
        unknown = sorted(set(cfg) - set(fields))
        if unknown:
            raise ConfigError(f"{owner}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}.")
        kwargs = cfg
    return {**fields, **kwargs}


class CLIPModel(nn.Module, _CLIPPretrained):
    """transformers' CLIPModel: text and vision towers, projections, learned temperature.

    text_config / vision_config: dicts of CLIPTextModel / CLIPVisionModel fields (missing ones take
    transformers' defaults). projection_dim: the shared embedding size P. logit_scale starts at
    logit_scale_init_value (log of the temperature's inverse, 2.6592 = log(1/0.07)).

    apply(v, input_ids=[B_t, L] int, pixel_values=[B_i, H, W, C], attention_mask=None)
      -> CLIPOutput(logits_per_image [B_i, B_t], logits_per_text [B_t, B_i],
                    text_embeds [B_t, P], image_embeds [B_i, P] (L2-normalised, float32), ...).
    apply(v, input_ids, attention_mask=None, method="get_text_features") -> [B_t, P]
    apply(v, pixel_values, method="get_image_features") -> [B_i, P]   (projected, not normalised)
    """
    text_config: Mapping[str, Any] | None = None
    vision_config: Mapping[str, Any] | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    scan_layers: bool = False

    pt_supported = {"projection_dim": is_int}
    pt_model_type = "clip"

    def __post_init__(self):
        # Validate the tower configs now (unknown fields are errors) and store them complete and
        # immutable, so equal architectures compare equal and the module stays hashable.
        for part, tower in (("text_config", CLIPTextModel), ("vision_config", CLIPVisionModel)):
            full = _tower_config(tower, getattr(self, part), f"CLIPModel.{part}", tolerant=False)
            object.__setattr__(self, part, flax.core.FrozenDict(full))
        super().__post_init__()

    @classmethod
    def from_pt_config(cls, cfg: Mapping[str, Any]):
        """Read transformers' nested CLIPConfig (``text_config_dict`` / ``vision_config_dict`` of
        old configs override ``text_config`` / ``vision_config``, as in transformers)."""
        cfg = dict(cfg)
        sub = {}
        for part, tower in (("text", CLIPTextModel), ("vision", CLIPVisionModel)):
            merged = dict(cfg.get(f"{part}_config") or {})
            merged.update(cfg.get(f"{part}_config_dict") or {})
            sub[f"{part}_config"] = flax.core.FrozenDict(
                _tower_config(tower, merged, f"CLIPModel.{part}_config", tolerant=True))
        top = filter_config(_clean_hf_config({k: v for k, v in cfg.items() if k not in sub}),
                            {k: d for k, d in cls._arch_fields().items() if k not in sub},
                            owner=cls.__name__, supported=cls.pt_supported)
        return cls(**sub, **top)

    def pt_config(self) -> dict[str, Any]:
        out = super().pt_config()
        out["text_config"] = {**self._text_fields(), "model_type": CLIPTextModel.pt_model_type}
        out["vision_config"] = {**self._vision_fields(), "model_type": CLIPVisionModel.pt_model_type}
        return out

    def _text_fields(self) -> dict[str, Any]:
        return dict(self.text_config)

    def _vision_fields(self) -> dict[str, Any]:
        return dict(self.vision_config)

    def setup(self):
        text, vision = self._text_fields(), self._vision_fields()
        self.text_model = _text_transformer(text, self._runtime(), "CLIPModel.text_config")
        self.vision_model = _vision_transformer(vision, self._runtime(), "CLIPModel.vision_config")
        f = self.initializer_factor
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False,
                                        kernel_init=_normal(text["hidden_size"] ** -0.5 * f),
                                        dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False,
                                          kernel_init=_normal(vision["hidden_size"] ** -0.5 * f),
                                          dtype=self.dtype, param_dtype=self.param_dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init_value),
                                      (), self.param_dtype)

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids [B, L] int -> projected pooled text features [B, P] (not normalised)."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, H, W, C] -> projected pooled image features [B, P] (not normalised)."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
                 attention_mask: jax.Array | None = None) -> CLIPOutput:
        text_out = self.text_model(input_ids, attention_mask)
        vision_out = self.vision_model(pixel_values)
        text = self.text_projection(text_out.pooler_output).astype(jnp.float32)
        image = self.visual_projection(vision_out.pooler_output).astype(jnp.float32)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        logits_per_text = (text @ image.T) * jnp.exp(self.logit_scale.astype(jnp.float32))  # [B_t, B_i]
        return CLIPOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                          text_embeds=text, image_embeds=image, text_model_output=text_out,
                          vision_model_output=vision_out)

    def dummy_inputs(self):
        text, vision = self._text_fields(), self._vision_fields()
        ids = jnp.zeros((1, text["max_position_embeddings"]), jnp.int32)
        pixels = jnp.zeros((1, vision["image_size"], vision["image_size"], vision["num_channels"]))
        return (ids, pixels), {}


def clip_pixel_values(images: jax.Array, *, image_size: int | None = None,
                      mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> jax.Array:
    """Images -> CLIP pixel_values, as CLIP's image processor normalises them.

    images: uint8 ``[B, H, W, C]`` in [0, 255], or float ``[B, H, W, C]`` in [-1, 1] (jaxgen's
            model range). Returns float32 ``[B, S, S, C]`` = (x01 - mean) / std, with x01 in [0, 1].
    image_size: resize to S x S first with jax.image.resize (bicubic on [0, 1] values); CLIP's
            processor instead resizes the short side with PIL and centre-crops, so resized
            inputs match transformers' processor only approximately. None keeps H x W.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise DataError(f"clip_pixel_values: images must be [B, H, W, C], got shape {tuple(images.shape)}.")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 255.0
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = (images.astype(jnp.float32) + 1.0) / 2.0
    else:
        raise DataError(f"clip_pixel_values: images must be uint8 or float, got {images.dtype}.")
    if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
        raise DataError(f"clip_pixel_values: {images.shape[-1]} channels but mean/std have "
                        f"{len(mean)}/{len(std)} entries; pass per-channel mean and std.")
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bicubic")
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
