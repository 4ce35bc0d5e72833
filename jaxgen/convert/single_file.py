"""Original single-file Stable Diffusion 1.x / 2.x checkpoints (CompVis / Stability layout) <->
jaxgen pipelines.

    pipe = StableDiffusionPipeline.from_single_file("v1-5.safetensors", config="sd15_configs/")
    pipe.save_single_file("out.safetensors")          # the same layout back

A single file holds the three networks of LatentDiffusion under one state dict:

  ``model.diffusion_model.*``          the U-Net (``input_blocks`` / ``middle_block`` /
                                       ``output_blocks``, resnets as ``in_layers`` / ``out_layers``)
  ``first_stage_model.*``              the VAE (``encoder.down.{i}.block.{j}``, ``mid.attn_1`` with
                                       1x1-conv q / k / v / proj_out weights [C, C, 1, 1])
  ``cond_stage_model.transformer.*``   SD 1.x: transformers' CLIPTextModel, keys as diffusers'
  ``cond_stage_model.model.*``         SD 2.x: OpenCLIP's text tower (``transformer.resblocks.{n}``,
                                       fused ``attn.in_proj_weight`` = [q; k; v], ``ln_1``,
                                       ``mlp.c_fc``, ``positional_embedding``, ``ln_final``)

The file names no architecture, so ``config`` gives it: a diffusers pipeline folder (its
model_index.json, unet/vae/text_encoder config.json, tokenizer/ and scheduler/; weights in it
are not read) or a dict of the component configs, as diffusers' ``from_single_file(config=)``.

How the mapping is built: ``ldm_table`` turns the diffusers-layout PyTorch keys of the three
modules (``tables.key_table`` of their parameters: the same keys ``load_pretrained`` reads) into
one table LDM key -> ``Slot`` (component, diffusers key(s), how the tensor changes: copied, a
[C, C] matrix stored as a [C, C, 1, 1] conv, or q / k / v stacked into one in_proj). Reading
checks the file against that table (every key used, none missing, every shape equal: a
WeightError names them in LDM names, with both shapes), rebuilds the diffusers-layout state dicts
and hands them to each module's ``params_from_state_dict`` (the strict Flax conversion of
``jaxgen.convert.tables``); writing runs the same table backwards from ``state_dict_from_params``.
So no key is mapped twice, and the LDM naming lives only here.

Keys a real checkpoint carries that are not network weights are named and skipped, never
guessed: LatentDiffusion's noise-schedule buffers (``betas``, ``alphas_cumprod``, ...; the
scheduler config defines the schedule), ``logvar``, CLIP's ``position_ids`` buffer, OpenCLIP's
``text_projection`` and ``logit_scale`` and its last block (``resblocks.{L}`` for an L-layer text
encoder: SD 2.x conditions on the penultimate layer, so diffusers' text encoder has one layer
fewer), and the EMA copy ``model_ema.*`` (used instead of the U-Net with ``extract_ema=True``,
as diffusers). Anything else unused is an error.

Writing produces what the pipeline runs: no schedule buffers, and for the OpenCLIP layout no
unused last block or projection (diffusers reads such files; the original LDM code loads them
with ``strict=False``, which its scripts use).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgen.convert import tables
from jaxgen.convert.config import check_types, read_json
from jaxgen.convert.pretrained import _resolve, class_name_of
from jaxgen.convert.safetensors_io import PICKLE_SUFFIXES, _load_pickle, read_safetensors_file, write_weights
from jaxgen.errors import ConfigError, WeightError

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."     # SD 1.x text encoder (transformers' names)
OPEN_CLIP_PREFIX = "cond_stage_model.model."       # SD 2.x text encoder (OpenCLIP's names)
EMA_PREFIX = "model_ema."
TEXT_LAYOUTS = ("clip", "open_clip")
COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}

# LatentDiffusion's registered buffers: the DDPM schedule (from the scheduler config here) and
# the learned-logvar table of its loss. Not network weights.
LDM_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
    "model_ema.decay", "model_ema.num_updates",
    CLIP_PREFIX + "text_model.embeddings.position_ids",
})
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale")      # the contrastive head, under OPEN_CLIP_PREFIX


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one LDM tensor comes from: ``component``'s diffusers-layout key(s) and the change.

    kind: "copy" (same tensor), "conv1x1" (a [C, C] Linear weight stored as a [C, C, 1, 1]
    Conv2d weight: the VAE's mid-block attention), "stack" (q, k, v stacked on axis 0: OpenCLIP's
    in_proj_weight [3D, D] / in_proj_bias [3D]).
    """

    component: str
    keys: tuple[str, ...]
    kind: str = "copy"


# ------------------------------------------------------------------------------------------------
# diffusers key -> LDM key, per network (pure functions of the key and the block structure)
# ------------------------------------------------------------------------------------------------
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


class _NoName(Exception):
    """A diffusers key the original layout has no name for (turned into a ConfigError)."""


def _split_leaf(rest: str) -> tuple[str, str]:
    """'norm1.weight' -> ('norm1', 'weight'); 'to_out.0.bias' -> ('to_out.0', 'bias')."""
    module, _, leaf = rest.rpartition(".")
    if not module:
        raise _NoName(rest)
    return module, leaf


def _renamed(rest: str, names: Mapping[str, str]) -> str:
    module, leaf = _split_leaf(rest)
    if module not in names:
        raise _NoName(rest)
    return f"{names[module]}.{leaf}"


def unet_ldm_key(key: str, layers_per_block: int, up_with_attention: frozenset[int]) -> str:
    """The LDM name (after ``model.diffusion_model.``) of a UNet2DConditionModel key.

    Down block b, layer j lives at ``input_blocks.{1 + b (L + 1) + j}`` (``.0`` resnet, ``.1``
    transformer), its downsampler at index ``1 + b (L + 1) + L`` (``.0.op``); up block b, layer j
    at ``output_blocks.{b (L + 1) + j}``, its upsampler in the block's last entry, after the
    transformer if the block has one (``.2.conv``, else ``.1.conv``); the mid block is
    ``middle_block.{0, 2}`` (resnets) and ``middle_block.1`` (transformer). L = layers_per_block.
    """
    L = layers_per_block
    module, leaf = _split_leaf(key)
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, b, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            base = 1 + b * (L + 1)
            if part == "resnets" and j < L:
                return f"input_blocks.{base + j}.0.{_renamed(rest, _UNET_RESNET)}"
            if part == "attentions" and j < L:
                return f"input_blocks.{base + j}.1.{rest}"
            if part == "downsamplers" and j == 0 and rest.startswith("conv."):
                return f"input_blocks.{base + L}.0.op.{rest[len('conv.'):]}"
        else:
            base = b * (L + 1)
            if part == "resnets" and j <= L:
                return f"output_blocks.{base + j}.0.{_renamed(rest, _UNET_RESNET)}"
            if part == "attentions" and j <= L:
                return f"output_blocks.{base + j}.1.{rest}"
            if part == "upsamplers" and j == 0 and rest.startswith("conv."):
                return f"output_blocks.{base + L}.{2 if b in up_with_attention else 1}.{rest}"
        raise _NoName(key)
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, k, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "resnets" and k < 2:
            return f"middle_block.{2 * k}.{_renamed(rest, _UNET_RESNET)}"
        if part == "attentions" and k == 0:
            return f"middle_block.1.{rest}"
    raise _NoName(key)


def vae_ldm_key(key: str, num_up_blocks: int) -> tuple[str, str]:
    """(LDM name after ``first_stage_model.``, slot kind) of an AutoencoderKL key. The decoder's
    up blocks are numbered from the bottom in LDM: diffusers' up_blocks.i is ``up.{n - 1 - i}``."""
    module, leaf = _split_leaf(key)
    for side in ("encoder", "decoder"):
        if module == f"{side}.conv_norm_out":
            return f"{side}.norm_out.{leaf}", "copy"
        if module in (f"{side}.conv_in", f"{side}.conv_out"):
            return key, "copy"
    if module in ("quant_conv", "post_quant_conv"):
        return key, "copy"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_renamed(m.group(3), _VAE_RESNET)}", "copy"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}", "copy"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        i = num_up_blocks - 1 - int(m.group(1))
        return f"decoder.up.{i}.block.{m.group(2)}.{_renamed(m.group(3), _VAE_RESNET)}", "copy"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"decoder.up.{num_up_blocks - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}", "copy"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key)
    if m:
        return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_renamed(m.group(3), _VAE_RESNET)}", "copy"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key)
    if m:
        name = _renamed(m.group(2), _VAE_ATTN)
        conv = name.endswith(".weight") and not name.startswith("norm.")
        return f"{m.group(1)}.mid.attn_1.{name}", ("conv1x1" if conv else "copy")
    raise _NoName(key)


def open_clip_ldm_key(key: str) -> tuple[str, int | None]:
    """(LDM name after ``cond_stage_model.model.``, q/k/v index or None) of a CLIPTextModel key:
    q / k / v projections are the rows [0:D], [D:2D], [2D:3D] of one ``attn.in_proj_*``."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    if key in fixed:
        return fixed[key], None
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
    if not m:
        raise _NoName(key)
    n, rest = m.group(1), m.group(2)
    qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
    if qkv:
        return f"transformer.resblocks.{n}.attn.in_proj_{qkv.group(2)}", "qkv".index(qkv.group(1))
    return f"transformer.resblocks.{n}.{_renamed(rest, _OPEN_CLIP_LAYER)}", None


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
def diffusers_shapes(module) -> dict[str, tuple[int, ...]]:
    """{diffusers-layout PyTorch key: shape} of a jaxgen module's parameters (no compute, no
    memory: the key rule of ``jaxgen.convert.tables`` applied to ``abstract_params``)."""
    abstract = module.abstract_params()
    flat = traverse_util.flatten_dict(dict(abstract))
    out = {}
    for path, (key, layout) in tables.key_table(abstract, module.pt_renames()).items():
        view = np.broadcast_to(np.zeros((), np.float32), flat[path].shape)   # no memory
        out[key] = tuple(tables._to_torch_layout(view, layout).shape)      # tables' layout rule
    return out


def _layers_per_block(unet) -> int:
    lpb = unet.layers_per_block
    if isinstance(lpb, (tuple, list)):
        if len(set(lpb)) != 1:
            raise ConfigError(f"UNet2DConditionModel: layers_per_block={tuple(lpb)} differs per block; the "
                              "original Stable Diffusion layout numbers blocks with one layers_per_block.")
        lpb = lpb[0]
    return int(lpb)


def ldm_table(shapes: Mapping[str, Mapping[str, tuple]], unet, vae, text_layout: str) -> dict[str, Slot]:
    """LDM key -> Slot for every parameter of the three networks.

    shapes: {"unet" | "vae" | "text_encoder": {diffusers key: shape}} (``diffusers_shapes``);
    unet, vae: the modules (their block structure); text_layout: "clip" (SD 1.x) or "open_clip"
    (SD 2.x). A diffusers key the original layout cannot name is a ConfigError.
    """
    if text_layout not in TEXT_LAYOUTS:
        raise ValueError(f"text_layout={text_layout!r}; use one of {TEXT_LAYOUTS}.")
    L = _layers_per_block(unet)
    up_attn = frozenset(int(k.split(".")[1]) for k in shapes["unet"] if re.match(r"up_blocks\.\d+\.attentions\.", k))
    n_up = len(vae.up_block_types)
    table: dict[str, Slot] = {}
    stacks: dict[str, list] = {}

    def add(ldm_key: str, slot: Slot):
        if ldm_key in table:
            raise WeightError(f"single-file key table collision: {slot.keys} and {table[ldm_key].keys} both "
                              f"map to {ldm_key!r}.")
        table[ldm_key] = slot

    for component, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", None)):
        for key in shapes[component]:
            try:
                if component == "unet":
                    add(UNET_PREFIX + unet_ldm_key(key, L, up_attn), Slot("unet", (key,)))
                elif component == "vae":
                    name, kind = vae_ldm_key(key, n_up)
                    add(VAE_PREFIX + name, Slot("vae", (key,), kind))
                elif text_layout == "clip":
                    if not key.startswith("text_model."):
                        raise _NoName(key)
                    add(CLIP_PREFIX + key, Slot("text_encoder", (key,)))
                else:
                    name, index = open_clip_ldm_key(key)
                    if index is None:
                        add(OPEN_CLIP_PREFIX + name, Slot("text_encoder", (key,)))
                    else:
                        stacks.setdefault(OPEN_CLIP_PREFIX + name, [None] * 3)[index] = key
            except _NoName:
                owner = COMPONENTS[component]
                raise ConfigError(f"{owner} parameter {key!r} has no name in the original Stable Diffusion "
                                  f"single-file layout ({text_layout} text encoder); single files hold SD 1.x / "
                                  "2.x networks: load this model from a diffusers folder instead.") from None
    for ldm_key, keys in stacks.items():
        if None in keys:
            raise ConfigError(f"CLIPTextModel: {ldm_key} needs q, k and v projections; found {keys}.")
        add(ldm_key, Slot("text_encoder", tuple(keys), "stack"))
    return table


def ldm_shape(slot: Slot, shapes: Mapping[str, Mapping[str, tuple]]) -> tuple[int, ...]:
    """The shape the LDM tensor of ``slot`` has in a file."""
    parts = [tuple(shapes[slot.component][k]) for k in slot.keys]
    if slot.kind == "conv1x1":
        return parts[0] + (1, 1)
    if slot.kind == "stack":
        return (sum(p[0] for p in parts),) + parts[0][1:]
    return parts[0]


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a single-file checkpoint as NumPy arrays (.safetensors; .ckpt / .pt only
    with allow_pickle=True, through torch's weights-only loader, unwrapping ``state_dict``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightError(f"{path}: no such file; pass the path of a .safetensors checkpoint.")
    if path.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise WeightError(f"{path} is a PyTorch pickle, which can run arbitrary code, so jaxgen refuses it "
                              "by default. Convert it to .safetensors, or pass allow_pickle=True to read it with "
                              "torch.load(weights_only=True).")
        return _load_pickle(path)
    return read_safetensors_file(path)


def text_layout_of(checkpoint: Mapping[str, Any], where: str = "checkpoint") -> str:
    """"clip" (``cond_stage_model.transformer.*``, SD 1.x) or "open_clip"
    (``cond_stage_model.model.*``, SD 2.x), from the keys present."""
    clip = any(k.startswith(CLIP_PREFIX) for k in checkpoint)
    open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in checkpoint)
    if clip and open_clip:
        raise WeightError(f"{where} holds two text encoders ({CLIP_PREFIX}* and {OPEN_CLIP_PREFIX}*); an SD "
                          "1.x / 2.x checkpoint has one.")
    if not clip and not open_clip:
        raise WeightError(f"{where} holds no text encoder ({CLIP_PREFIX}* for SD 1.x or {OPEN_CLIP_PREFIX}* "
                          "for SD 2.x); jaxgen reads complete single-file checkpoints.")
    return "clip" if clip else "open_clip"


def ema_key(ldm_key: str) -> str:
    """LDM's EMA name of a U-Net key: ``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b``."""
    return EMA_PREFIX + "".join(ldm_key.split(".")[1:])


def _has_ema(checkpoint: Mapping[str, Any]) -> bool:
    return any(k.startswith(EMA_PREFIX) and k not in LDM_BUFFERS for k in checkpoint)


def check_checkpoint(checkpoint: Mapping[str, Any], *, extract_ema: bool = False, where: str = "checkpoint") -> str:
    """The text encoder layout ("clip" / "open_clip") of an original-layout checkpoint, after the
    checks that need no configuration: a U-Net present, one text encoder, EMA weights if asked."""
    if not any(k.startswith(UNET_PREFIX) for k in checkpoint):
        raise WeightError(f"{where} has no {UNET_PREFIX}* keys: it is not an original-layout Stable Diffusion "
                          "checkpoint. A diffusers folder loads with from_pretrained.")
    layout = text_layout_of(checkpoint, where)
    if extract_ema and not _has_ema(checkpoint):
        raise WeightError(f"{where} holds no EMA weights ({EMA_PREFIX}*); pass extract_ema=False.")
    return layout


def split_checkpoint(checkpoint: Mapping[str, np.ndarray], shapes: Mapping[str, Mapping[str, tuple]], unet, vae,
                     text_encoder, *, extract_ema: bool = False, where: str = "checkpoint"
                     ) -> dict[str, dict[str, np.ndarray]]:
    """The diffusers-layout state dicts {"unet", "vae", "text_encoder"} of an LDM checkpoint,
    checked strictly against the table: a WeightError names the unexpected keys, the missing ones
    and the mis-shaped ones (file shape and expected shape), in LDM names.

    extract_ema: read the U-Net from the EMA copy (``model_ema.*``) instead of
    ``model.diffusion_model.*`` (which is then skipped), as diffusers' ``extract_ema``.
    """
    layout = check_checkpoint(checkpoint, extract_ema=extract_ema, where=where)
    table = ldm_table(shapes, unet, vae, layout)
    source = {k: k for k in table}                      # LDM key -> key in the file
    has_ema = _has_ema(checkpoint)
    if extract_ema:
        for k in table:
            if k.startswith(UNET_PREFIX):
                source[k] = ema_key(k)
        if len(set(source.values())) != len(source):
            raise WeightError(f"{where}: the flattened EMA names ({EMA_PREFIX}*) of this U-Net collide; "
                              "pass extract_ema=False.")

    def skipped(key: str) -> bool:
        if key in LDM_BUFFERS:
            return True
        if key.startswith(EMA_PREFIX):
            return not extract_ema
        if extract_ema and key in table and key.startswith(UNET_PREFIX):
            return True                                  # the non-EMA copy
        if layout == "open_clip" and key.startswith(OPEN_CLIP_PREFIX):
            rest = key[len(OPEN_CLIP_PREFIX):]
            return rest in OPEN_CLIP_UNUSED or rest.startswith(
                f"transformer.resblocks.{text_encoder.num_hidden_layers}.")
        return False

    used = set(source.values())
    unexpected = sorted(k for k in checkpoint if k not in used and not skipped(k))
    missing = sorted(src for src in source.values() if src not in checkpoint)
    bad_shape = []
    for k, slot in table.items():
        src = source[k]
        if src in checkpoint:
            want = ldm_shape(slot, shapes)
            got = tuple(np.shape(checkpoint[src]))
            if got != want:
                bad_shape.append(f"{src}: file has {got}, expected {want}")
    problems = []
    if unexpected:
        problems.append(f"unmapped keys ({len(unexpected)}): {', '.join(unexpected[:12])}")
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}")
    if bad_shape:
        problems.append(f"mis-shaped ({len(bad_shape)}): {'; '.join(bad_shape[:8])}")
    if problems:
        raise WeightError(f"{where} does not fit the configured pipeline ({layout} text encoder): "
                          + " | ".join(problems) + ". Check that config describes this checkpoint's "
                          "architecture (SD 1.x vs 2.x, sizes, layers).")
    ignored = sorted(k for k in checkpoint if k not in used)
    if not extract_ema and has_ema:
        log.warning("%s: the U-Net's EMA copy (%s*) is not used; pass extract_ema=True to load it instead.",
                    where, EMA_PREFIX)
    if ignored:
        log.info("%s: %d non-weight / unused key(s) skipped: %s", where, len(ignored), ", ".join(ignored[:8]))

    out: dict[str, dict[str, np.ndarray]] = {c: {} for c in COMPONENTS}
    for k, slot in table.items():
        value = np.asarray(checkpoint[source[k]])
        target = out[slot.component]
        if slot.kind == "copy":
            target[slot.keys[0]] = value
        elif slot.kind == "conv1x1":
            target[slot.keys[0]] = value.reshape(value.shape[:2])       # [C, C, 1, 1] -> [C, C]
        else:                                                            # [3D, ...] -> 3 x [D, ...]
            for key, part in zip(slot.keys, np.split(value, 3, axis=0)):
                target[key] = part
    return out


def read_single_file(path: str | os.PathLike, unet, vae, text_encoder, *, extract_ema: bool = False,
                     allow_pickle: bool = False, dtype=jnp.float32) -> dict[str, Any]:
    """The params {"unet", "vae", "text_encoder"} of the given jaxgen modules from an original
    single-file checkpoint (see the module docstring). dtype: parameter dtype (None keeps the
    stored dtypes)."""
    where = os.fspath(path)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
    check_checkpoint(checkpoint, extract_ema=extract_ema, where=where)      # before any tracing
    shapes = {c: diffusers_shapes(m) for c, m in modules.items()}
    states = split_checkpoint(checkpoint, shapes, unet, vae, text_encoder, extract_ema=extract_ema, where=where)
    params = {}
    for c, m in modules.items():
        try:
            params[c] = m.params_from_state_dict(states[c], dtype=None if dtype is None else np.dtype(dtype))
        except WeightError as e:      # dtype / NaN problems, named by the diffusers key
            raise WeightError(f"{where} ({c}): {e}") from e
    return jax.tree_util.tree_map(jnp.asarray, params)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def auto_text_layout(text_encoder) -> str:
    """The single-file layout of a text encoder: OpenCLIP ("open_clip", SD 2.x) for an exact-GELU
    encoder (OpenCLIP's towers use nn.GELU), CLIP ("clip", SD 1.x) for quick_gelu (OpenAI CLIP)."""
    return "open_clip" if text_encoder.hidden_act == "gelu" else "clip"


def ldm_state_dict(unet, vae, text_encoder, params: Mapping[str, Any], *, text_layout: str = "auto",
                   dtype=None) -> dict[str, np.ndarray]:
    """The original-layout state dict of the three networks (host NumPy arrays).

    params: {"unet", "vae", "text_encoder"} parameter trees; text_layout: "clip", "open_clip" or
    "auto" (``auto_text_layout``); dtype: cast the tensors (e.g. np.float16), None keeps them.
    """
    if text_layout == "auto":
        text_layout = auto_text_layout(text_encoder)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    states = {c: m.state_dict_from_params(params[c], dtype=dtype) for c, m in modules.items()}
    shapes = {c: {k: v.shape for k, v in s.items()} for c, s in states.items()}
    out = {}
    for k, slot in ldm_table(shapes, unet, vae, text_layout).items():
        parts = [states[slot.component][key] for key in slot.keys]
        if slot.kind == "conv1x1":
            out[k] = parts[0].reshape(parts[0].shape + (1, 1))          # [C, C] -> [C, C, 1, 1]
        elif slot.kind == "stack":
            out[k] = np.concatenate(parts, axis=0)                       # 3 x [D, ...] -> [3D, ...]
        else:
            out[k] = parts[0]
    return out


def save_single_file(pipe, path: str | os.PathLike, *, text_encoder_layout: str = "auto", dtype=None) -> str:
    """Write ``pipe``'s U-Net, VAE and text encoder as one original-layout ``.safetensors`` file
    (diffusers' ``from_single_file`` and jaxgen's read it back with the pipeline's config folder).

    text_encoder_layout: "clip" (SD 1.x), "open_clip" (SD 2.x) or "auto" (``auto_text_layout``).
    dtype: cast the saved tensors (e.g. np.float16); None keeps them. Returns the path.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: single files are written as safetensors; name the file *.safetensors.")
    state = ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, pipe.params, text_layout=text_encoder_layout,
                           dtype=dtype)
    folder, name = os.path.split(path)
    write_weights(folder or ".", name[: -len(".safetensors")], state)
    return path


# ------------------------------------------------------------------------------------------------
# the pipeline's configuration (what the file does not say)
# ------------------------------------------------------------------------------------------------
def _config_dicts(config, tokenizer) -> tuple[dict[str, dict], Any, str]:
    """({"unet", "vae", "text_encoder", "scheduler"} config dicts, tokenizer (folder or object),
    where) from a diffusers pipeline folder or a dict of component configs."""
    from jaxgen.pipelines.stable_diffusion import NOT_RUN, PIPELINE_CLASSES, REQUIRED
    from jaxgen.diffusion.schedulers.base import SCHEDULER_CONFIG_NAME

    if isinstance(config, (str, os.PathLike)):
        folder = os.fspath(config)
        if not os.path.isdir(folder):
            raise ConfigError(f"config={folder!r} is not a folder; pass a diffusers Stable Diffusion folder "
                              "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ configs) "
                              "or a dict of the component configs.")
        index = read_json(os.path.join(folder, "model_index.json"))
        if index.get("_class_name") not in PIPELINE_CLASSES:
            raise ConfigError(f"{folder}/model_index.json describes a {index.get('_class_name')!r}; single files "
                              f"load with a {', '.join(PIPELINE_CLASSES)} config folder.")
        for comp, spec in index.items():
            if (not comp.startswith("_") and isinstance(spec, (list, tuple)) and comp not in REQUIRED
                    and comp not in NOT_RUN and spec[0] is not None):
                raise ConfigError(f"{folder}: component {comp!r} ({spec}) is not part of a Stable Diffusion "
                                  "1.x / 2.x pipeline.")
        cfgs = {c: read_json(os.path.join(folder, c, "config.json")) for c in COMPONENTS}
        cfgs["scheduler"] = read_json(os.path.join(folder, "scheduler", SCHEDULER_CONFIG_NAME))
        return cfgs, (tokenizer if tokenizer is not None else os.path.join(folder, "tokenizer")), folder
    if isinstance(config, Mapping):
        need = [*COMPONENTS, "scheduler"]
        absent = [c for c in need if not isinstance(config.get(c), Mapping)]
        if absent:
            raise ConfigError(f"config dict lacks {absent}; it needs the config dicts of {', '.join(need)} "
                              "(each component's config.json / scheduler_config.json).")
        tok = tokenizer if tokenizer is not None else config.get("tokenizer")
        if tok is None:
            raise ConfigError("config is a dict without 'tokenizer': pass tokenizer= (a CLIP tokenizer folder "
                              "or a jaxgen CLIPTokenizer); single files hold no tokenizer.")
        return {c: dict(config[c]) for c in need}, tok, "config"
    raise TypeError(f"config must be a diffusers pipeline folder or a dict of component configs, got "
                    f"{type(config).__name__}.")


def _module(component: str, cfg: Mapping[str, Any], where: str):
    name = class_name_of(cfg, where)
    if name != COMPONENTS[component]:
        raise ConfigError(f"{where}: {component} is a {name}; a Stable Diffusion pipeline takes a "
                          f"{COMPONENTS[component]}.")
    cls = _resolve(name)
    module = cls.from_pt_config(cfg)
    check_types({k: getattr(module, k) for k in cls.config_fields()}, cls, owner=f"{where}: {name}")
    return module


def load_single_file(path: str | os.PathLike, config, *, tokenizer=None, extract_ema: bool = False,
                     allow_pickle: bool = False, dtype=jnp.float32) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusionPipeline.__init__`` from a single-file
    checkpoint and its configuration.

    config: a diffusers Stable Diffusion folder (configs only are read) or a dict
        {"unet": cfg, "vae": cfg, "text_encoder": cfg, "scheduler": cfg, "tokenizer": folder|CLIPTokenizer}.
    tokenizer: overrides the config's tokenizer (a folder or a jaxgen CLIPTokenizer).
    extract_ema, allow_pickle, dtype: see ``read_single_file`` / ``read_checkpoint``.
    """
    from jaxgen.diffusion.schedulers import scheduler_from_config
    from jaxgen.tokenizer import CLIPTokenizer, load_tokenizer

    cfgs, tok, where = _config_dicts(config, tokenizer)
    modules = {c: _module(c, cfgs[c], f"{where}/{c}" if where != "config" else f"config[{c!r}]")
               for c in COMPONENTS}
    params = read_single_file(path, **modules, extract_ema=extract_ema, allow_pickle=allow_pickle, dtype=dtype)
    if not isinstance(tok, CLIPTokenizer):
        tok = load_tokenizer(tok)
    return dict(**modules, params=params, tokenizer=tok, scheduler=scheduler_from_config(cfgs["scheduler"]),
                scheduler_config=cfgs["scheduler"],
                use_attention_mask=bool(cfgs["text_encoder"].get("use_attention_mask", False)))
