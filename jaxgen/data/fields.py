"""What a task needs from each example: named inputs with a kind and a per-example shape.

A task declares its inputs (``Task.inputs()``), e.g. an image-to-image task

    {"image": Input("image", (32, 32, 3)), "source": Input("image", (32, 32, 3)),
     "caption": Input("text", optional=True)}

and the engine gathers exactly those fields from the dataset (``gather``), checks them, and
batches them as named arrays of any rank (the first axis is the example). A missing or
mis-shaped field is a DataError that names it, what was expected and what the dataset has.

Kinds and what a batch holds:
    "image"  uint8 [..., H, W, C] in 0..255 (one image, a pair member, or frames [F, H, W, C])
    "int"    integer ids (labels, attributes, noise levels), held as int32
    "float"  float32 values (e.g. precomputed latents)
    "text"   str per example; tasks turn text into arrays (token ids, rows of a context table)
             before batching, so no str reaches the device
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxgen.errors import DataError

KINDS = ("image", "int", "float", "text")


@dataclasses.dataclass(frozen=True)
class Input:
    """One field a task needs.

    kind: one of KINDS. shape: the per-example shape (without the example axis); None entries
    match any size (e.g. (None, 32, 32, 3) for clips of any length). optional: absent is fine
    (the task copes without it). doc: what the task does with it (shown in errors).
    """

    kind: str
    shape: tuple = ()
    optional: bool = False
    doc: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Input kind {self.kind!r}: choose one of {KINDS}")

    def describe(self) -> str:
        dims = ", ".join("*" if d is None else str(d) for d in self.shape)
        dtype = {"image": "uint8", "int": "int32", "float": "float32", "text": "str"}[self.kind]
        return f"{dtype} [N{', ' + dims if dims else ''}]"


def check_field(name: str, value, spec: Input, where: str = "") -> np.ndarray | list[str]:
    """``value`` (all examples of field ``name``) checked against ``spec``; returns it as a numpy
    array of the kind's dtype ([N, *shape]) or, for text, a list of N str. A grayscale image field
    given as [N, H, W] for a spec of C = 1 is accepted as [N, H, W, 1]."""
    prefix = f"{where}: " if where else ""
    want = spec.describe()
    if spec.kind == "text":
        if isinstance(value, str) or not isinstance(value, (list, tuple, np.ndarray)) or not all(
                isinstance(t, (str, np.str_)) for t in value):
            raise DataError(f"{prefix}field {name!r} must be text ({want}), got {type(value).__name__}.")
        return [str(t) for t in value]
    x = np.asarray(value)
    if spec.kind == "image" and len(spec.shape) >= 1 and spec.shape[-1] == 1 and x.ndim == len(spec.shape):
        x = x[..., None]                      # [N, ..., H, W] grey -> [N, ..., H, W, 1]
    got = f"{x.dtype} {list(x.shape)}"
    if x.ndim != len(spec.shape) + 1 or any(d is not None and int(d) != s for d, s in zip(spec.shape, x.shape[1:])):
        hint = ""
        if spec.kind == "image" and x.ndim == len(spec.shape) + 1 and x.shape[-1] != spec.shape[-1] \
                and spec.shape[-1] is not None and x.shape[-3] == spec.shape[-1]:
            hint = " (NCHW? transpose to NHWC)"
        raise DataError(f"{prefix}field {name!r} is {got}; this task takes {want}{hint}.")
    if len(x) == 0:
        raise DataError(f"{prefix}field {name!r} has no examples ({got}); pass at least one.")
    if spec.kind == "image":
        if x.dtype != np.uint8:
            raise DataError(f"{prefix}field {name!r} has dtype {x.dtype}; images are uint8 in [0, 255] "
                            "(e.g. np.round(x * 255).astype(np.uint8) for floats in [0, 1]).")
        return x
    if spec.kind == "int":
        if not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"{prefix}field {name!r} is {got}; this task takes integer ids {want}.")
        return x.astype(np.int32)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{prefix}field {name!r} is {got}; this task takes numbers {want}.")
    return x.astype(np.float32)


def gather(source, inputs: Mapping[str, Input], where: str = "") -> dict:
    """The fields ``inputs`` names, checked, from ``source`` (an ArrayDataset, or a mapping
    name -> values such as a user's batch). Optional inputs that are absent are left out.

    Returns {name: numpy array [N, ...] or list of N str}. Raises DataError naming every missing
    required field and what ``source`` has, or the first mis-shaped field.
    """
    from jaxgen.data.dataset import ArrayDataset

    if isinstance(source, ArrayDataset):
        have = source.field_names
        get = source.field
        where = where or f"dataset {source.name!r} split {source.split!r}"
    elif isinstance(source, Mapping):
        have = tuple(source)
        get = source.__getitem__
    else:
        raise TypeError(f"gather takes an ArrayDataset or a mapping of fields, got {type(source).__name__}")
    missing = [n for n, spec in inputs.items() if not spec.optional and n not in have]
    if missing:
        needs = "; ".join(f"{n}: {inputs[n].describe()}" + (f" ({inputs[n].doc})" if inputs[n].doc else "")
                          for n in missing)
        raise DataError(f"{(where + ': ') if where else ''}missing field(s) {', '.join(map(repr, missing))} "
                        f"that this task needs ({needs}); it has {', '.join(have) or 'no fields'}.")
    out = {n: check_field(n, get(n), spec, where) for n, spec in inputs.items() if n in have}
    sizes = {n: len(v) for n, v in out.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"{(where + ': ') if where else ''}fields have different numbers of examples {sizes}.")
    return out


def example_arrays(inputs: Mapping[str, Input], batch: int = 1) -> dict[str, np.ndarray]:
    """Zero arrays [batch, *shape] of every non-text input (shapes only matter: for init and
    eval_shape). A None dimension is an error: such tasks build their own example batch."""
    out = {}
    for name, spec in inputs.items():
        if spec.kind == "text":
            continue
        if any(d is None for d in spec.shape):
            raise ValueError(f"input {name!r} has an open shape {spec.shape}; the task must give its own "
                             "example_batch().")
        dtype = {"image": np.uint8, "int": np.int32, "float": np.float32}[spec.kind]
        out[name] = np.zeros((batch, *spec.shape), dtype)
    return out
