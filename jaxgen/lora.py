"""LoRA (low-rank adaptation) for jaxgen's models: pure functions over a separate pytree, and the
Stable Diffusion pipeline's loading / fusing methods (diffusers' names and meanings).

    lora = init_lora(unet_params, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, key=key)
    params = merge(unet_params, lora, 0.8)            # W + 0.8 * (alpha / rank) * down @ up
    save_lora("out_dir", {"unet": lora})              # diffusers' pytorch_lora_weights.safetensors
    adapter = load_lora("out_dir", {"unet": unet_params, "text_encoder": te_params})

    pipe.load_lora_weights("style.safetensors", adapter_name="style")   # diffusers or kohya layout
    pipe.set_adapters(["style", "detail"], adapter_weights=[0.7, 0.4])  # unfused: merged per call
    pipe.fuse_lora(lora_scale=0.9); pipe.unfuse_lora(); pipe.unload_lora_weights()

The LoRA tree of one model is a dict ``{flax path "a/b/kernel": LoraWeights}``; an *adapter*
(what a file holds) is ``{component: LoRA tree}`` with components "unet" and "text_encoder".
``LoraWeights`` keeps the two factors in jaxgen's kernel layouts, so that ``down @ up`` (a
contraction over the rank axis) has the kernel's shape:

    Dense kernel [in, out]:        down [in, r],          up [r, out]
    Conv kernel [kh, kw, in, out]: down [kh, kw, in, r],  up [r, out]

PyTorch's ``lora_A`` ([r, in] or [r, in, kh, kw], peft's / kohya's ``lora_down``) is ``down``
transposed the way ``jaxgen.convert.tables`` transposes a kernel; ``lora_B`` ([out, r] or
[out, r, 1, 1], ``lora_up``) is ``up`` transposed. The update of a kernel W is
``W + scale * (alpha / r) * down @ up``, which is peft's ``W + scale * (lora_alpha / r) * B @ A``.

Files (safetensors only; see docs/LORA.md for every accepted spelling):

* diffusers / peft: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (also the diffusers
  spellings ``.lora.down/up.weight``, ``.lora_linear_layer.down/up.weight`` and the old attention
  processor ``<attn>.processor.to_q_lora.down.weight``), ``text_encoder.<module>...``, optional
  ``<module>.alpha`` scalars, and the ``lora_adapter_metadata`` header diffusers writes (peft's
  LoraConfig per component: r, lora_alpha, rank_pattern, alpha_pattern, use_rslora). Without an
  alpha, alpha = rank (scale 1), as diffusers does.
* kohya: ``lora_unet_<module with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  and ``lora_te_...`` for the text encoder (SD 1.x / 2.x names; the module is found by matching
  the underscore form of every module name of the model, so no guessing of where dots were).

Every key must map to a Dense or Conv kernel of the target parameters, or loading raises a
WeightError that names it; shapes are checked (a rank mismatch names both shapes).

Unfused adapters enter compiled code as ``LoraParams`` (base parameters, LoRA trees, a float32
[K] array of scales): ``materialize`` merges them inside the jitted function, so changing a scale
changes an array, never the program.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgen.convert import tables
from jaxgen.errors import ConfigError, WeightError

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"        # diffusers' default file name
METADATA_KEY = "lora_adapter_metadata"                      # diffusers' safetensors header entry
# file key prefixes -> component
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
TEXT_MODEL = "text_model."                                   # transformers 4 CLIP prefix (optional in files)

# diffusers / peft key suffixes -> which factor
_DIFFUSERS_FACTOR = re.compile(r"^(?P<module>.+?)\.(?:lora_A|lora\.down|lora_linear_layer\.down)\.weight$"
                               r"|^(?P<module_up>.+?)\.(?:lora_B|lora\.up|lora_linear_layer\.up)\.weight$")
# the old attention-processor layout: <attn>[.processor].to_q_lora.down.weight
_OLD_PROCESSOR = re.compile(r"^(?P<attn>.+?)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
                            r"(?P<factor>down|up)\.weight$")
_OLD_NAMES = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
              "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_NOT_IMPLEMENTED = (("lora_magnitude_vector", "DoRA (use_dora) adapters"), ("dora_scale", "DoRA adapters"),
                    ("lora_B.bias", "LoRA biases (lora_bias=True)"), ("hada_", "LyCORIS LoHa adapters"),
                    ("lokr_", "LyCORIS LoKr adapters"), ("lora_mid", "LyCORIS LoCon (Tucker) mid factors"))
HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------
# the pytree
# ------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class LoraWeights:
    """The low-rank update of one kernel: ``delta = (alpha / r) * down @ up`` (contracting r).

    down: float [in, r] (Dense) or [kh, kw, in, r] (Conv): PyTorch's lora_A in jaxgen's layout.
    up:   float [r, out]: PyTorch's lora_B. alpha: the LoRA alpha (static: not a leaf, so
    gradients and optimizers see only down and up); r = down.shape[-1].
    """

    down: jax.Array
    up: jax.Array
    alpha: float = flax.struct.field(pytree_node=False)

    @property
    def rank(self) -> int:
        return int(self.down.shape[-1])

    def delta(self, scale=1.0) -> jax.Array:
        """scale * (alpha / r) * down @ up: the kernel's shape ([in, out] or [kh, kw, in, out])."""
        product = jnp.tensordot(self.down, self.up, axes=1, precision=HIGHEST)
        return (scale * (self.alpha / self.rank)) * product


@flax.struct.dataclass
class LoraParams:
    """A model's parameters with unfused LoRA trees, as one pytree argument of a jitted function:
    ``materialize`` turns it into ``merge(base, loras, scales)`` inside the trace.

    base: the model's params tree; loras: K LoRA trees ({path: LoraWeights}); scales: float32 [K]
    (traced: new values do not recompile).
    """

    base: Any
    loras: tuple
    scales: jax.Array


def materialize(params):
    """``params`` itself, or for ``LoraParams`` the merged parameters (pure; call it inside jit)."""
    if isinstance(params, LoraParams):
        return merge(params.base, params.loras, params.scales)
    return params


# ------------------------------------------------------------------------------------------------
# pure functions: init, merge, size
# ------------------------------------------------------------------------------------------------
def _join(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _kernel_modules(params, renames=None) -> dict[str, tuple[tuple[str, ...], str, tuple]]:
    """PyTorch module name -> (Flax kernel path, layout "linear" | "conv", kernel shape) for every
    Dense / Conv kernel of ``params`` (arrays or ShapeDtypeStructs)."""
    leaves = traverse_util.flatten_dict(dict(params))
    out = {}
    for path, (key, layout) in tables.key_table(params, renames).items():
        if layout in ("linear", "conv") and key.endswith(".weight"):
            out[key[: -len(".weight")]] = (path, layout, tuple(leaves[path].shape))
    return out


def _matches(name: str, target_modules) -> bool:
    """peft's rule: a str is a regular expression matched against the whole module name; a list
    entry matches the name itself or its last dotted components."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def init_lora(params: Mapping[str, Any], target_modules: str | Sequence[str], rank: int, key: jax.Array, *,
              alpha: float | None = None, renames: Mapping[str, str] | None = None,
              dtype=jnp.float32) -> dict[str, LoraWeights]:
    """A fresh LoRA tree for training, initialised as peft does: ``down`` (lora_A) uniform in
    ±1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5); fan_in = in * kh * kw) and ``up`` (lora_B)
    zero, so ``merge(params, init_lora(...), s)`` equals ``params`` exactly.

    params: one model's params tree (arrays or ShapeDtypeStructs), e.g. a UNet2DConditionModel's.
    target_modules: PyTorch module names as peft takes them: a list of names matched against the
        end of each dotted module name (["to_q", "to_k", "to_v", "to_out.0"], ["q_proj", "fc1"],
        ["conv1"]), or one regular expression matched against the whole name. Only Dense and
        Conv kernels can be targeted.
    rank: r >= 1; key: a jax.random key (one uniform draw for all modules, laid out in sorted
        path order: the same key gives the same tree). alpha: LoRA alpha (default: rank, i.e.
        scale 1). renames: the module class's ``pt_renames()`` (jaxgen's modules have none).
    Returns {Flax kernel path "a/b/kernel": LoraWeights}.
    """
    rank = int(rank)
    if rank < 1:
        raise ConfigError(f"init_lora: rank={rank}; it must be >= 1.")
    if not target_modules:
        raise ConfigError("init_lora: target_modules is empty; name the modules to adapt, e.g. "
                          "['to_q', 'to_k', 'to_v', 'to_out.0'].")
    alpha = float(rank if alpha is None else alpha)
    modules = _kernel_modules(params, renames)
    chosen = sorted((path, layout, shape) for name, (path, layout, shape) in modules.items()
                    if _matches(name, target_modules))
    if not chosen:
        raise ConfigError(f"init_lora: target_modules={target_modules!r} matches no Dense or Conv kernel; "
                          f"module names look like {', '.join(sorted(modules)[:4])} (peft's naming).")
    # one uniform draw for every module (one random program, whatever the shapes), split on the host
    sizes = [int(np.prod(shape[:-1])) * rank for _, _, shape in chosen]
    flat = np.asarray(jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0))
    out, start = {}, 0
    for (path, layout, shape), size in zip(chosen, sizes):
        in_shape, out_dim = shape[:-1], shape[-1]               # [in] or [kh, kw, in]
        bound = 1.0 / math.sqrt(int(np.prod(in_shape)))
        down = (flat[start:start + size] * bound).reshape(in_shape + (rank,))
        start += size
        out[_join(path)] = LoraWeights(down=jnp.asarray(down, dtype), up=jnp.zeros((rank, out_dim), dtype),
                                       alpha=alpha)
    return out


def merge(params: Mapping[str, Any], lora, scales=1.0) -> dict:
    """The parameters with LoRA updates added: for every targeted kernel W,
    ``W + sum_k scales[k] * (alpha_k / r_k) * down_k @ up_k``. Pure and jittable (scales may be
    traced); leaves no LoRA touches are returned as they are (the same arrays, outside jit).

    params: one model's params tree (Flax layout). lora: one LoRA tree ({path: LoraWeights}) or a
    sequence of K trees. scales: a scalar (for one tree) or K scalars / a [K] array.
    Returns a params tree with the structure, shapes and dtypes of ``params``.
    """
    return _merge_with(_add_updates, params, lora, scales)


def _as_trees(lora) -> list:
    return [lora] if isinstance(lora, Mapping) else list(lora)


def _merge_with(add_updates, params, lora, scales) -> dict:
    """merge, with the kernel arithmetic done by ``add_updates(kernels, loras, scales)``."""
    loras = _as_trees(lora)
    if not loras:
        return params
    flat = traverse_util.flatten_dict(dict(params))
    kernels = {}
    for tree in loras:
        for name in tree:
            path = tuple(name.split("/"))
            if path not in flat:
                raise WeightError(f"merge: the LoRA targets {name}, which these parameters do not have; "
                                  "merge each LoRA tree into the model it was made for.")
            kernels[name] = flat[path]
    for name, value in add_updates(kernels, loras, scales).items():
        flat[tuple(name.split("/"))] = value
    return traverse_util.unflatten_dict(flat)


def _add_updates(kernels: dict, loras: list, scales) -> dict:
    """{path: W + sum_k scales[k] (alpha_k / r_k) down_k @ up_k} for the targeted kernels only."""
    scales = jnp.asarray(scales, jnp.float32)
    if scales.ndim == 0:
        scales = jnp.broadcast_to(scales, (len(loras),))
    if scales.shape != (len(loras),):
        raise ConfigError(f"merge: {scales.shape[0] if scales.ndim == 1 else scales.shape} scales for "
                          f"{len(loras)} LoRA trees; pass one scale per tree.")
    total: dict[str, jax.Array] = {}
    for k, tree in enumerate(loras):
        for name, w in tree.items():
            d = w.delta(scales[k])
            if d.shape != kernels[name].shape:
                raise WeightError(f"merge: the LoRA update of {name} has shape {d.shape}, the kernel "
                                  f"{kernels[name].shape}.")
            total[name] = d if name not in total else total[name] + d
    return {name: kernels[name] + d.astype(kernels[name].dtype) for name, d in total.items()}


# fuse_lora: the targeted kernels only, one compiled program per LoRA structure
_add_updates_jit = jax.jit(_add_updates)


def lora_nbytes(lora) -> int:
    """Bytes held by the arrays of a LoRA tree (or adapter, or any pytree of them)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(lora)))


# ------------------------------------------------------------------------------------------------
# reading files
# ------------------------------------------------------------------------------------------------
def lora_file(path_or_dir: str | os.PathLike, weight_name: str | None = None) -> str:
    """The safetensors file a LoRA is read from: a file path as it is; a folder joined with
    ``weight_name``, else its pytorch_lora_weights.safetensors, else its only .safetensors file."""
    path = os.fspath(path_or_dir)
    if os.path.isdir(path):
        if weight_name is not None:
            path = os.path.join(path, weight_name)
        elif os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
            path = os.path.join(path, LORA_WEIGHT_NAME)
        else:
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(found) != 1:
                raise ConfigError(f"{path}: {'no' if not found else len(found)} .safetensors files"
                                  f"{' (' + ', '.join(found) + ')' if found else ''}; pass weight_name= "
                                  "to say which file holds the LoRA.")
            path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such LoRA file. jaxgen reads local safetensors files; download it "
                          "first and pass its path.")
    if not path.endswith(".safetensors"):
        raise WeightError(f"{path}: jaxgen reads LoRA weights from .safetensors files only (pickle files "
                          "can run code); convert it to safetensors.")
    return path


def read_lora_file(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
    """(tensors, diffusers' adapter metadata dict or None) of one safetensors file."""
    from safetensors import SafetensorError, safe_open

    from jaxgen.convert.safetensors_io import read_safetensors_file

    state = read_safetensors_file(path)
    try:
        with safe_open(path, framework="numpy") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightError(f"{path}: cannot read the safetensors header ({e}); the file is corrupt.") from e
    raw = header.get(METADATA_KEY)
    if raw is None:
        return state, None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise WeightError(f"{path}: the {METADATA_KEY!r} header entry is not valid JSON ({e}); the file "
                          "is damaged: export it again.") from e
    if not isinstance(meta, dict):
        raise WeightError(f"{path}: the {METADATA_KEY!r} header entry must be a JSON object, found "
                          f"{type(meta).__name__}.")
    return state, meta


class _Targets:
    """Where the modules of one component live: module name -> (Flax path, layout, kernel shape),
    also under the file spellings (without ``text_model.``; kohya's underscore form)."""

    def __init__(self, component: str, params, renames=None):
        self.component = component
        self.modules = _kernel_modules(params, renames)
        self.aliases: dict[str, str | None] = {}
        for name in self.modules:
            spellings = {name}
            if name.startswith(TEXT_MODEL):
                spellings.add(name[len(TEXT_MODEL):])
            for s in spellings:
                self._alias(s, name)
        self.kohya: dict[str, str | None] = {}
        for s, name in list(self.aliases.items()):
            if name is not None:
                u = s.replace(".", "_")
                self.kohya[u] = name if self.kohya.get(u, name) == name else None   # None: ambiguous

    def _alias(self, spelling: str, name: str) -> None:
        self.aliases[spelling] = name if self.aliases.get(spelling, name) == name else None

    def resolve(self, spelling: str, file_key: str, kohya: bool = False) -> str:
        table = self.kohya if kohya else self.aliases
        name = table.get(spelling, "")
        if name:
            return name
        if name is None:
            raise WeightError(f"LoRA key {file_key!r}: {spelling!r} names more than one {self.component} module; "
                              "this file cannot be mapped unambiguously.")
        hint = (" (kohya names of SDXL's sgm U-Net, input_blocks / output_blocks, are not supported)"
                if kohya and re.search(r"(input|output|middle)_block", spelling) else "")
        raise WeightError(f"LoRA key {file_key!r} names no Dense or Conv kernel of the {self.component} "
                          f"(module {spelling!r}){hint}; the LoRA was made for another model, or the key "
                          f"is not a LoRA factor. {self.component} modules look like "
                          f"{', '.join(sorted(self.modules)[:3])}.")


def _pattern_value(patterns: Mapping[str, Any], names: Iterable[str]):
    """peft's get_pattern_key: the value of the first pattern p with re.match((.*\\.)?(p)$, name)."""
    for pattern, value in patterns.items():
        if any(re.match(rf"(.*\.)?({pattern})$", n) for n in names):
            return value
    return None


def _component_metadata(meta: Mapping[str, Any] | None, component: str, where: str) -> dict | None:
    if meta is None:
        return None
    prefix = component + "."
    cfg = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    if not cfg:
        return None
    for field, what in (("use_dora", "DoRA adapters"), ("lora_bias", "LoRA biases")):
        if cfg.get(field):
            raise WeightError(f"{where}: the {component} adapter uses {field}=True ({what}), which jaxgen does "
                              "not implement.")
    if "r" not in cfg:
        raise WeightError(f"{where}: the {component} adapter metadata has no 'r' (rank); the header is "
                          "incomplete: export the LoRA again.")
    return cfg


def _as_float(value, what: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise WeightError(f"{what} must be one finite number, found {arr.dtype} of shape {arr.shape}.")
    return float(arr.reshape(()))


def _split_key(key: str) -> tuple[str, str, str, bool]:
    """(component, module spelling, factor "down" | "up" | "alpha", kohya?) of one file key."""
    for marker, what in _NOT_IMPLEMENTED:
        if marker in key:
            raise WeightError(f"LoRA key {key!r}: {what} are not implemented by jaxgen (plain LoRA only).")
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            base, _, suffix = key[len(prefix):].partition(".")
            if suffix not in _KOHYA_SUFFIXES:
                raise WeightError(f"LoRA key {key!r}: kohya keys end in .lora_down.weight, .lora_up.weight or "
                                  ".alpha; this one is not a LoRA factor jaxgen reads.")
            return component, base, _KOHYA_SUFFIXES[suffix], True
    if key.startswith(("lora_te1_", "lora_te2_")):
        raise WeightError(f"LoRA key {key!r} belongs to SDXL's two text encoders; this pipeline has one "
                          "(Stable Diffusion 1.x / 2.x LoRAs use lora_te_).")
    for prefix, component in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            rest = key[len(prefix):].replace(".processor.", ".")     # diffusers drops it too
            m = _DIFFUSERS_FACTOR.match(rest)
            if m:
                return ((component, m.group("module"), "down", False) if m.group("module") else
                        (component, m.group("module_up"), "up", False))
            m = _OLD_PROCESSOR.match(rest)
            if m:
                module = f"{m.group('attn')}.{_OLD_NAMES[component][m.group('proj')]}"
                return component, module, m.group("factor"), False
            if rest.endswith(".alpha"):
                return component, rest[: -len(".alpha")], "alpha", False
            raise WeightError(f"LoRA key {key!r} is not a LoRA factor (expected <module>.lora_A.weight, "
                              ".lora_B.weight, .lora.down/up.weight or .alpha).")
    raise WeightError(f"LoRA key {key!r} has no component prefix jaxgen knows: diffusers files start with "
                      f"'unet.' or 'text_encoder.', kohya files with 'lora_unet_' or 'lora_te_'.")


def _to_flax_factors(down: np.ndarray, up: np.ndarray, layout: str, kernel: tuple, where: str, key_down: str,
                     key_up: str) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch lora_A / lora_B -> (down, up) in jaxgen's layout, every shape checked."""
    r = down.shape[0] if down.ndim else 0
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[1] != r:
        raise WeightError(f"{where}: rank mismatch: {key_down} has shape {tuple(down.shape)} and {key_up} "
                          f"{tuple(up.shape)}; lora_A is [r, in(, kh, kw)] and lora_B [out, r(, 1, 1)] with "
                          "the same r.")
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise WeightError(f"{where}: {key_up} has shape {tuple(up.shape)}; lora_B must be [out, r] or a "
                          "1x1 convolution [out, r, 1, 1].")
    out_dim = kernel[-1]
    if layout == "linear":
        in_dim, spatial = kernel[0], (1, 1)
    else:
        spatial, in_dim = kernel[:2], kernel[2]
    want_down = (r, in_dim) + tuple(spatial)
    ok_down = (down.shape == want_down) or (down.ndim == 2 and spatial == (1, 1) and down.shape == (r, in_dim))
    if not ok_down or up.shape[0] != out_dim:
        raise WeightError(f"{where}: {key_down} {tuple(down.shape)} / {key_up} {tuple(up.shape)} do not fit the "
                          f"kernel ({'Linear' if layout == 'linear' else 'Conv2d'} with in={in_dim}, "
                          f"out={out_dim}, kernel {tuple(spatial)}): lora_A must be "
                          f"{(r, in_dim) + (tuple(spatial) if layout == 'conv' else ())}, lora_B "
                          f"({out_dim}, {r}). The LoRA was made for another model.")
    up_flax = up.reshape(out_dim, r).T                                  # [out, r(,1,1)] -> [r, out]
    if layout == "linear":
        down_flax = down.reshape(r, in_dim).T                           # [r, in(,1,1)] -> [in, r]
    else:
        down_flax = down.reshape(want_down).transpose(2, 3, 1, 0)        # [r, in, kh, kw] -> [kh, kw, in, r]
    return down_flax, up_flax


def parse_lora(state_dict: Mapping[str, Any], targets: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None,
               renames: Mapping[str, Mapping[str, str]] | None = None, where: str = "LoRA",
               dtype=np.float32) -> dict[str, dict[str, LoraWeights]]:
    """An adapter ({component: LoRA tree}) from a LoRA state dict in the diffusers/peft or kohya layout.

    state_dict: file key -> array (NumPy / anything np.asarray takes). targets: {component: that
    model's params tree} for the components the file may hold ("unet", "text_encoder").
    metadata: diffusers' ``lora_adapter_metadata`` dict ("unet.r", "unet.lora_alpha", ...) or None.
    renames: per component, the module class's ``pt_renames()`` (jaxgen's modules have none).
    Every key must be used; anything else is a WeightError naming the key.
    """
    renames = renames or {}
    maps = {c: _Targets(c, p, renames.get(c)) for c, p in targets.items()}
    found: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
    for key, value in state_dict.items():
        component, spelling, factor, kohya = _split_key(key)
        if component not in maps:
            raise WeightError(f"{where}: key {key!r} is for the {component}, which is not a target here "
                              f"(targets: {', '.join(maps)}).")
        name = maps[component].resolve(spelling, key, kohya)
        slot = found[(component, name)]
        if factor in slot:
            raise WeightError(f"{where}: keys {slot[factor][0]!r} and {key!r} both give the {factor} factor "
                              f"of {component} module {name}; keep one spelling.")
        slot[factor] = (key, np.asarray(value))
    cfgs = {c: _component_metadata(metadata, c, where) for c in maps}
    out: dict[str, dict[str, LoraWeights]] = {}
    for (component, name), slot in sorted(found.items()):
        for need, partner in (("down", "up"), ("up", "down")):
            if need not in slot:
                raise WeightError(f"{where}: {slot[partner][0]!r} has no matching "
                                  f"{'lora_A / lora_down' if need == 'down' else 'lora_B / lora_up'} key; "
                                  "every LoRA module needs both factors.")
        (kd, down), (ku, up) = slot["down"], slot["up"]
        for k, v in ((kd, down), (ku, up)):
            if not np.issubdtype(v.dtype, np.floating) and v.dtype.name != "bfloat16":
                raise WeightError(f"{where}: {k} holds {v.dtype}; LoRA factors must be floating point.")
            if not np.isfinite(v.astype(np.float32)).all():
                raise WeightError(f"{where}: {k} holds NaN/Inf values; the file is damaged.")
        path, layout, kernel = maps[component].modules[name]
        d, u = _to_flax_factors(down.astype(dtype), up.astype(dtype), layout, kernel, where, kd, ku)
        rank = d.shape[-1]
        alpha = _as_float(slot["alpha"][1], f"{where}: {slot['alpha'][0]}") if "alpha" in slot else None
        cfg = cfgs[component]
        if cfg is not None:
            names = {name, name[len(TEXT_MODEL):]} if name.startswith(TEXT_MODEL) else {name}
            want_r = _pattern_value(cfg.get("rank_pattern") or {}, names)
            want_r = int(cfg["r"] if want_r is None else want_r)
            if want_r != rank:
                raise WeightError(f"{where}: {component} module {name}: the metadata says rank {want_r} but "
                                  f"{kd} has shape {tuple(down.shape)} and {ku} {tuple(up.shape)} (rank {rank}).")
            meta_alpha = _pattern_value(cfg.get("alpha_pattern") or {}, names)
            meta_alpha = float(cfg.get("lora_alpha", 8) if meta_alpha is None else meta_alpha)
            if cfg.get("use_rslora"):                     # scaling alpha / sqrt(r) == (alpha sqrt(r)) / r
                meta_alpha *= math.sqrt(rank)
            if alpha is not None and not math.isclose(alpha, meta_alpha, rel_tol=1e-6):
                raise WeightError(f"{where}: {slot['alpha'][0]} = {alpha} contradicts the metadata's alpha "
                                  f"{meta_alpha} for {component} module {name}.")
            alpha = meta_alpha
        out.setdefault(component, {})[_join(path)] = LoraWeights(
            down=jnp.asarray(d), up=jnp.asarray(u), alpha=float(rank if alpha is None else alpha))
    return out


def load_lora(path_or_dir: str | os.PathLike, targets: Mapping[str, Any], *, weight_name: str | None = None,
              renames: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, dict[str, LoraWeights]]:
    """Read a LoRA safetensors file (diffusers/peft or kohya layout) into an adapter.

    path_or_dir: a .safetensors file, or a folder (with ``weight_name``, or holding
    pytorch_lora_weights.safetensors or a single .safetensors file).
    targets: {component: params tree} ("unet": U-Net params, "text_encoder": CLIPTextModel params).
    Returns {component: {Flax kernel path: LoraWeights}} (float32) for the components the file holds.
    """
    path = lora_file(path_or_dir, weight_name)
    state, meta = read_lora_file(path)
    if not state:
        raise WeightError(f"{path}: the file holds no tensors; it is not a LoRA.")
    try:
        return parse_lora(state, targets, metadata=meta, renames=renames, where=path)
    except WeightError as e:
        msg = str(e)
        raise WeightError(msg if msg.startswith(path) else f"{path}: {msg}") from e


# ------------------------------------------------------------------------------------------------
# saving (diffusers' layout)
# ------------------------------------------------------------------------------------------------
def _torch_module(path: str, ndim: int, renames=None) -> str:
    key, _ = tables.torch_key(tuple(path.split("/")), ndim)
    key = dict(renames or {}).get(key, key)
    return key[: -len(".weight")]


def lora_state_dict(lora: Mapping[str, Mapping[str, LoraWeights]], *,
                    renames: Mapping[str, Mapping[str, str]] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, metadata) of an adapter in diffusers' layout: ``<component>.<module>.lora_A.weight``
    / ``.lora_B.weight`` in PyTorch layouts, and per component a peft LoraConfig (r and lora_alpha
    = the most common values, rank_pattern / alpha_pattern for the others, target_modules = every
    module), keys prefixed "<component>." as diffusers' save_lora_weights writes them."""
    renames = renames or {}
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, Any] = {}
    for component, tree in lora.items():
        if component not in COMPONENTS:
            raise ConfigError(f"save_lora: unknown component {component!r}; an adapter's components are "
                              f"{', '.join(COMPONENTS)}.")
        if not tree:
            continue
        ranks, alphas = {}, {}
        for path, w in sorted(tree.items()):
            down = np.asarray(jax.device_get(w.down), np.float32)
            up = np.asarray(jax.device_get(w.up), np.float32)
            module = _torch_module(path, down.ndim, renames.get(component))
            r = down.shape[-1]
            if down.ndim == 2:
                a, b = down.T, up.T                                       # [r, in], [out, r]
            elif down.ndim == 4:
                a, b = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]  # [r, in, kh, kw], [out, r, 1, 1]
            else:
                raise WeightError(f"save_lora: {component} {path}: down has shape {down.shape}; expected "
                                  "[in, r] or [kh, kw, in, r].")
            tensors[f"{component}.{module}.lora_A.weight"] = np.ascontiguousarray(a)
            tensors[f"{component}.{module}.lora_B.weight"] = np.ascontiguousarray(b)
            # peft matches names against the model's modules: the text encoder's without text_model.
            # (transformers 5 CLIP has none; as a suffix, it also matches transformers 4's)
            short = module[len(TEXT_MODEL):] if module.startswith(TEXT_MODEL) else module
            ranks[short], alphas[short] = int(r), float(w.alpha)
        r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
        a0 = collections.Counter(alphas.values()).most_common(1)[0][0]
        cfg = {"r": r0, "lora_alpha": a0,
               "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r0},
               "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != a0},
               "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
               "use_dora": False, "lora_bias": False, "peft_type": "LORA"}
        metadata.update({f"{component}.{k}": v for k, v in cfg.items()})
    return tensors, metadata


def save_lora(path: str | os.PathLike, lora: Mapping[str, Mapping[str, LoraWeights]], *,
              weight_name: str = LORA_WEIGHT_NAME, renames: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Write an adapter ({"unet": tree, "text_encoder": tree}) as diffusers'
    ``save_lora_weights`` does: one safetensors file (float32) with peft key names and the
    ``lora_adapter_metadata`` header, which diffusers' ``load_lora_weights`` and
    ``jaxgen.lora.load_lora`` read back exactly (alphas included).

    path: a folder (the file is folder/weight_name) or a path ending in .safetensors.
    Returns the file path. The file is written to a temporary name, then renamed.
    """
    from safetensors.numpy import save_file

    tensors, metadata = lora_state_dict(lora, renames=renames)
    if not tensors:
        raise ConfigError("save_lora: the adapter holds no LoRA weights; pass {'unet': tree} and/or "
                          "{'text_encoder': tree}.")
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, weight_name)
    elif os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# the pipeline methods (diffusers' StableDiffusionLoraLoaderMixin names)
# ------------------------------------------------------------------------------------------------
class LoraLoaderMixin:
    """LoRA adapters on a pipeline with ``unet`` / ``text_encoder`` modules and ``params``.

    Adapters are kept apart from ``params``; at call time ``lora_call_params()`` hands the compiled
    stages ``LoraParams`` (every loaded adapter, scale 0 for inactive ones), so changing weights or
    the active set never recompiles. ``fuse_lora`` merges the active adapters into ``params`` once
    (the originals are kept, ``unfuse_lora`` restores them exactly); while fused, no unfused
    adapter is applied (peft's rule for merged layers).
    """

    LORA_COMPONENTS: tuple[str, ...] = COMPONENTS

    # -- state ------------------------------------------------------------------------------
    def _lora(self) -> dict:
        state = self.__dict__.get("_lora_state")
        if state is None:
            state = self.__dict__["_lora_state"] = {"adapters": {}, "active": {}, "originals": {}}
        return state

    def _lora_targets(self) -> tuple[dict, dict]:
        targets, renames = {}, {}
        for c in self.LORA_COMPONENTS:
            module = getattr(self, c)
            targets[c] = self.params[c]
            renames[c] = module.pt_renames() if hasattr(module, "pt_renames") else None
        return targets, renames

    def _check_not_fused(self, what: str) -> None:
        fused = sorted(self._lora()["originals"])
        if fused:
            raise ConfigError(f"{what}: LoRA is fused into the {' and '.join(fused)}; call unfuse_lora() first "
                              "(or unload_lora_weights() to keep the fused weights and drop the adapters).")

    # -- loading ----------------------------------------------------------------------------
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None) -> None:
        """Load a LoRA (diffusers/peft or kohya layout) as adapter ``adapter_name`` (default
        "default_<n>", n = adapters loaded so far) and make it the only active adapter, weight 1.

        pretrained_model_name_or_path_or_dict: a .safetensors file, a folder (see ``weight_name``;
        default pytorch_lora_weights.safetensors) or a state dict {key: array}.
        """
        self._check_not_fused("load_lora_weights")
        state = self._lora()
        name = f"default_{len(state['adapters'])}" if adapter_name is None else str(adapter_name)
        if name in state["adapters"]:
            raise ConfigError(f"load_lora_weights: adapter name {name!r} is already in use; pass another "
                              "adapter_name or delete_adapters() it first.")
        targets, renames = self._lora_targets()
        src = pretrained_model_name_or_path_or_dict
        if isinstance(src, Mapping):
            adapter = parse_lora(src, targets, renames=renames, where="state dict")
        else:
            adapter = load_lora(src, targets, weight_name=weight_name, renames=renames)
        if not adapter:
            raise WeightError(f"{src}: no LoRA weights for the {' or '.join(self.LORA_COMPONENTS)}.")
        mesh = getattr(self, "mesh", None)
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            adapter = jax.device_put(adapter, NamedSharding(mesh, PartitionSpec()))
        state["adapters"][name] = adapter
        state["active"] = {name: {c: 1.0 for c in self.LORA_COMPONENTS}}

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{component: names of the loaded adapters that hold weights for it}."""
        out: dict[str, list[str]] = {}
        for name, adapter in self._lora()["adapters"].items():
            for c in adapter:
                out.setdefault(c, []).append(name)
        return out

    def get_active_adapters(self) -> list[str]:
        """The names of the active adapters, in the order set_adapters gave them."""
        return list(self._lora()["active"])

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """Activate ``adapter_names`` (the others stay loaded, at weight 0) with their weights.

        adapter_weights: None (1.0 each), one float for all, or one entry per adapter: a float,
        None (1.0) or {"unet": w, "text_encoder": w} (a missing component gets 1.0). Weights are
        arrays in the compiled programs: changing them does not recompile.
        """
        self._check_not_fused("set_adapters")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = self._lora()["adapters"]
        missing = [n for n in names if n not in loaded]
        if missing:
            raise ConfigError(f"set_adapters: adapter(s) {missing} are not loaded; loaded: "
                              f"{sorted(loaded) or 'none'} (load_lora_weights(..., adapter_name=...) first).")
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ConfigError(f"set_adapters: {len(weights)} adapter_weights for {len(names)} adapters; pass one "
                              "per adapter (or one value for all).")
        active = {}
        for n, w in zip(names, weights):
            if isinstance(w, Mapping):
                unknown = set(w) - set(self.LORA_COMPONENTS)
                if unknown:
                    raise ConfigError(f"set_adapters: weights for {sorted(unknown)}; components are "
                                      f"{', '.join(self.LORA_COMPONENTS)}.")
                per = {}
                for c in self.LORA_COMPONENTS:
                    v = w.get(c)
                    if isinstance(v, Mapping):
                        raise ConfigError("set_adapters: per-block weights ({'down': ..., 'mid': ..., 'up': ...}) "
                                          "are not implemented; give one weight per component.")
                    per[c] = 1.0 if v is None else float(v)
            else:
                per = {c: 1.0 if w is None else float(w) for c in self.LORA_COMPONENTS}
            active[n] = per
        self._lora()["active"] = active

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Drop adapters (and from the active set)."""
        self._check_not_fused("delete_adapters")
        state = self._lora()
        for n in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            if n not in state["adapters"]:
                raise ConfigError(f"delete_adapters: adapter {n!r} is not loaded; loaded: {sorted(state['adapters'])}.")
            del state["adapters"][n]
            state["active"].pop(n, None)

    # -- fusing -----------------------------------------------------------------------------
    def _scales(self, component: str, names: Sequence[str]) -> np.ndarray:
        active = self._lora()["active"]
        return np.array([active[n][component] if n in active else 0.0 for n in names], np.float32)

    def fuse_lora(self, components: Sequence[str] = COMPONENTS, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: Sequence[str] | None = None) -> None:
        """Merge the active adapters (or ``adapter_names``) into ``params`` of ``components``:
        W + lora_scale * sum_k weight_k * (alpha / r) * down_k @ up_k. The original parameters are
        kept for ``unfuse_lora``. safe_fusing: refuse (WeightError) fused weights holding NaN/Inf."""
        state = self._lora()
        components = [components] if isinstance(components, str) else list(components)
        unknown = set(components) - set(self.LORA_COMPONENTS)
        if unknown:
            raise ConfigError(f"fuse_lora: unknown components {sorted(unknown)}; use {list(self.LORA_COMPONENTS)}.")
        already = [c for c in components if c in state["originals"]]
        if already:
            raise ConfigError(f"fuse_lora: LoRA is already fused into the {', '.join(already)}; unfuse_lora() first.")
        if adapter_names is not None:
            missing = [n for n in adapter_names if n not in state["adapters"]]
            if missing:
                raise ConfigError(f"fuse_lora: adapter(s) {missing} are not loaded; loaded: "
                                  f"{sorted(state['adapters'])}.")
        names = list(state["active"] if adapter_names is None else adapter_names)
        params = dict(self.params)
        for c in components:
            use = [n for n in names if c in state["adapters"][n]]
            if not use:
                continue
            weights = np.array([state["active"].get(n, {}).get(c, 1.0) for n in use], np.float32)
            fused = _merge_with(_add_updates_jit, params[c], [state["adapters"][n][c] for n in use],
                                float(lora_scale) * weights)
            if safe_fusing and not all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(fused)):
                raise WeightError(f"fuse_lora: fusing {use} into the {c} gives NaN/Inf weights; not fused.")
            state["originals"][c] = params[c]
            params[c] = fused
        if not any(c in state["originals"] for c in components):
            log.warning("fuse_lora: no active adapter holds weights for %s; nothing fused.", components)
        self.params = params

    def unfuse_lora(self, components: Sequence[str] = COMPONENTS) -> None:
        """Restore the parameters ``fuse_lora`` replaced (bit for bit); the adapters stay loaded."""
        state = self._lora()
        components = [components] if isinstance(components, str) else list(components)
        if not any(c in state["originals"] for c in components):
            log.warning("unfuse_lora: no LoRA is fused into %s; nothing to restore.", components)
        params = dict(self.params)
        for c in components:
            if c in state["originals"]:
                params[c] = state["originals"].pop(c)
        self.params = params

    def unload_lora_weights(self) -> None:
        """Drop every adapter. Fused weights stay in ``params`` (diffusers' behaviour: fuse, then
        unload, keeps the fused model); unfuse_lora() first to return to the original weights."""
        state = self._lora()
        state["adapters"].clear()
        state["active"].clear()
        state["originals"].clear()

    # -- what the compiled stages receive ---------------------------------------------------
    def lora_call_params(self) -> dict:
        """``params`` with each unfused component that has LoRA weights as ``LoraParams`` (every
        loaded adapter holding weights for it; scales = active weights, 0 for inactive adapters).
        The compiled stages ``materialize`` them; without adapters this is ``params`` itself."""
        state = self._lora()
        if not state["adapters"]:
            return self.params
        params = dict(self.params)
        for c in self.LORA_COMPONENTS:
            if c in state["originals"]:
                continue                         # fused: the merged weights alone (as peft's merged layers)
            names = [n for n, a in state["adapters"].items() if c in a]
            if names:
                params[c] = LoraParams(base=params[c], loras=tuple(state["adapters"][n][c] for n in names),
                                       scales=jnp.asarray(self._scales(c, names)))
        return params
