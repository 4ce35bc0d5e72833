"""Key tables between Flax parameter trees and PyTorch state dicts.

jaxgen's modules name their submodules after the PyTorch attributes, so one rule maps most keys:

* path segments join with ``.``; a segment ``name_N`` (a Linen list child) becomes ``name.N``
  unless it is a real PyTorch attribute named with a digit suffix (``KEEP_SUFFIX``);
* leaves: ``kernel`` -> ``weight`` (Dense [in, out] -> Linear [out, in]; Conv [kh, kw, in, out]
  -> Conv2d [out, in, kh, kw]; Conv [kt, kh, kw, in, out] -> Conv3d [out, in, kt, kh, kw]);
  ``scale`` -> ``weight`` (norms); ``embedding`` -> ``weight`` (Embed); ``bias`` and any other
  leaf keep their name and layout.

A class adds its own explicit renames (``renames``: Flax key -> PyTorch key, after the rule) for
what the rule cannot express. Conversion is strict both ways: every PyTorch key must be used,
every Flax parameter filled, every shape equal, every float parameter stored as floating point
(any float dtype is cast) and finite; otherwise a WeightError names the keys.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgen.errors import WeightError

# PyTorch attributes whose own name ends in _<digit> (not list indices).
KEEP_SUFFIX = frozenset({"linear_1", "linear_2"})
_LIST_CHILD = re.compile(r"^(.*)_(\d+)$")


def _segment(seg: str) -> str:
    if seg in KEEP_SUFFIX:
        return seg
    m = _LIST_CHILD.match(seg)
    return f"{m.group(1)}.{m.group(2)}" if m else seg


def torch_key(path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """(PyTorch key, layout) for a Flax parameter path; layout in {linear, conv, plain}."""
    *mods, leaf = path
    prefix = ".".join(_segment(s) for s in mods)
    layout = "plain"
    if leaf == "kernel":
        leaf, layout = "weight", {2: "linear", 4: "conv", 5: "conv3d"}.get(ndim, "plain")
        if layout == "plain":
            raise WeightError(f"{'/'.join(path)}: a kernel of rank {ndim} has no PyTorch layout rule.")
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    return (f"{prefix}.{leaf}" if prefix else leaf), layout


def _to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return x.T  # [in, out] -> [out, in]
    if layout == "conv":
        return x.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
    if layout == "conv3d":
        return x.transpose(4, 3, 0, 1, 2)  # [kt, kh, kw, in, out] -> [out, in, kt, kh, kw]
    return x


def _to_flax_layout(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return x.T
    if layout == "conv":
        return x.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    if layout == "conv3d":
        return x.transpose(2, 3, 4, 1, 0)  # [out, in, kt, kh, kw] -> [kt, kh, kw, in, out]
    return x


def key_table(abstract_params: Mapping[str, Any], renames: Mapping[str, str] | None = None
              ) -> dict[tuple[str, ...], tuple[str, str]]:
    """Flax path -> (PyTorch key, layout) for every parameter of ``abstract_params``.

    abstract_params: the ``params`` collection (arrays or ShapeDtypeStructs).
    renames: explicit per-class exceptions, PyTorch key given by the rule -> real PyTorch key.
    """
    renames = dict(renames or {})
    table = {}
    seen: dict[str, tuple[str, ...]] = {}
    for path, leaf in traverse_util.flatten_dict(dict(abstract_params)).items():
        key, layout = torch_key(path, len(leaf.shape))
        key = renames.get(key, key)
        if key in seen:
            raise WeightError(f"key table collision: {'/'.join(path)} and {'/'.join(seen[key])} "
                              f"both map to {key!r}")
        seen[key] = path
        table[path] = (key, layout)
    return table


def torch_to_flax(state_dict: Mapping[str, np.ndarray], abstract_params: Mapping[str, Any], *,
                  renames: Mapping[str, str] | None = None, ignore: tuple[str, ...] = (),
                  owner: str = "model", dtype=np.float32) -> dict:
    """Build the Flax ``params`` tree from a PyTorch state dict, strictly.

    ignore: regular expressions of PyTorch keys that are known buffers, not parameters
            (e.g. ``position_ids``); they are dropped. Any other unused key is an error.
    dtype:  floating tensors are cast to it (None keeps the stored dtype).
    """
    table = key_table(abstract_params, renames)
    leaves = traverse_util.flatten_dict(dict(abstract_params))
    flat, missing, bad_shape, bad_dtype, nonfinite = {}, [], [], [], []
    for path, (key, layout) in table.items():
        if key not in state_dict:
            missing.append(key)
            continue
        stored = np.asarray(state_dict[key])
        want = tuple(leaves[path].shape)
        # a layout transpose needs the rank it was written for: other ranks are mis-shaped too
        rank_ok = layout == "plain" or stored.ndim == {"linear": 2, "conv": 4, "conv3d": 5}[layout]
        value = _to_flax_layout(stored, layout) if rank_ok else stored
        if not rank_ok or tuple(value.shape) != want:
            bad_shape.append(f"{key}: file has {tuple(stored.shape)}, {owner} expects {want} (as {'/'.join(path)})")
            continue
        floating = jnp.issubdtype(value.dtype, jnp.floating)
        if jnp.issubdtype(leaves[path].dtype, jnp.floating) and not floating:
            bad_dtype.append(f"{key}: file has {value.dtype}, {owner} expects floating point")
            continue
        if floating and not np.isfinite(value).all():
            nonfinite.append(key)
            continue
        if dtype is not None and floating:
            value = value.astype(dtype)
        flat[path] = np.ascontiguousarray(value).reshape(value.shape)  # keeps 0-d leaves 0-d
    used = {k for k, _ in table.values()}
    unexpected = sorted(k for k in state_dict if k not in used
                        and not any(re.search(p, k) for p in ignore))
    problems = []
    if missing:
        problems.append(f"missing from the file ({len(missing)}): {', '.join(sorted(missing)[:20])}")
    if unexpected:
        problems.append(f"unexpected in the file ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if bad_shape:
        problems.append(f"mis-shaped ({len(bad_shape)}): {'; '.join(bad_shape[:10])}")
    advice = ["Check that config.json matches the weights (same class and sizes)"] if problems else []
    if bad_dtype:
        problems.append(f"not floating point ({len(bad_dtype)}): {'; '.join(bad_dtype[:10])}")
        advice.append("quantized or mis-exported weights cannot be loaded as they are: export float weights")
    if nonfinite:
        problems.append(f"holding NaN/Inf values ({len(nonfinite)}): {', '.join(sorted(nonfinite)[:20])}")
        advice.append("the file is damaged or was saved from a diverged model: export it again")
    if problems:
        advice = "; ".join(advice)
        raise WeightError(f"weights do not fit {owner}: " + " | ".join(problems) +
                          f". {advice[0].upper()}{advice[1:]}.")
    return traverse_util.unflatten_dict(flat)


def flax_to_torch(params: Mapping[str, Any], *, renames: Mapping[str, str] | None = None,
                  dtype=None) -> dict[str, np.ndarray]:
    """The PyTorch state dict of a Flax ``params`` tree (host NumPy arrays, PyTorch layouts)."""
    table = key_table(params, renames)
    flat = traverse_util.flatten_dict(dict(params))
    out = {}
    for path, (key, layout) in table.items():
        value = np.asarray(jax.device_get(flat[path]))
        if dtype is not None:
            value = value.astype(dtype)
        value = _to_torch_layout(value, layout)
        out[key] = np.ascontiguousarray(value).reshape(value.shape)  # keeps 0-d leaves 0-d
    return out
