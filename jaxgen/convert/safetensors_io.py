"""safetensors files and folders: reading (single or sharded) and writing, pickle refused.

A folder written by diffusers / transformers ``save_pretrained`` holds the weights either in one
file (``diffusion_pytorch_model.safetensors`` / ``model.safetensors``) or in shards listed by an
index (``*.safetensors.index.json``, ``{"weight_map": {key: shard_file}}``).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Mapping, Sequence

import numpy as np

from jaxgen.errors import WeightError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as NumPy arrays (bf16 comes back as ml_dtypes.bfloat16)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightError(f"{path}: cannot read this safetensors file ({e}). It is truncated or "
                          "corrupt: copy or export it again.") from e


def _read_index(index_path: str) -> dict[str, np.ndarray]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise WeightError(f"{index_path}: not a valid shard index (needs a 'weight_map' object): {e}") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightError(f"{index_path}: 'weight_map' must be a non-empty object of key -> shard file name, "
                          f"found {type(weight_map).__name__} {str(weight_map)[:80]}.")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise WeightError(f"{index_path}: weight_map[{key!r}] must be a shard file name, found {shard!r}.")
    folder = os.path.dirname(index_path)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise WeightError(f"{index_path} lists shard {shard!r}, which is missing from {folder}.")
        tensors = read_safetensors_file(shard_path)
        for key, value in tensors.items():
            if weight_map.get(key) != shard:
                raise WeightError(f"{shard_path} holds {key!r}, which the index {index_path} "
                                  f"places in {weight_map.get(key)!r}.")
            out[key] = value
    absent = sorted(set(weight_map) - set(out))
    if absent:
        raise WeightError(f"{index_path} lists keys that no shard holds: {', '.join(absent[:10])}")
    return out


def _load_pickle(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise WeightError(f"{path} is a PyTorch pickle; reading it needs torch installed "
                          "(pip install torch). Better: convert it to safetensors.") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for k, v in state.items():
        if hasattr(v, "detach"):
            v = v.detach()
            out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


def read_weights(folder: str, names: Sequence[str], *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The state dict stored in ``folder`` under one of ``names`` (file names without suffix).

    names: e.g. ("diffusion_pytorch_model",) or ("model",). Tries NAME.safetensors, then the
    sharded NAME.safetensors.index.json, then (only with allow_pickle=True) NAME.bin with torch's
    weights-only loader.
    """
    for name in names:
        single = os.path.join(folder, f"{name}.safetensors")
        if os.path.isfile(single):
            return read_safetensors_file(single)
        index = os.path.join(folder, f"{name}.safetensors.index.json")
        if os.path.isfile(index):
            return _read_index(index)
    pickles = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.endswith(PICKLE_SUFFIXES))
    if pickles:
        if not allow_pickle:
            raise WeightError(
                f"{folder} holds only pickle weights ({', '.join(map(os.path.basename, pickles))}). "
                "Pickle files can run arbitrary code, so jaxgen refuses them by default. Convert them "
                "to safetensors, or pass allow_pickle=True to read them with torch.load(weights_only=True).")
        return _load_pickle(pickles[0])
    others = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    hint = f" It has {', '.join(map(os.path.basename, others))}." if others else ""
    raise WeightError(f"{folder}: no weights found; expected "
                      f"{' or '.join(n + '.safetensors' for n in names)}.{hint}")


def write_weights(folder: str, name: str, tensors: Mapping[str, np.ndarray],
                  metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` to folder/NAME.safetensors (atomically: temp file, then rename)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.safetensors")
    tmp = path + ".tmp"
    # np.ascontiguousarray turns 0-d arrays (e.g. CLIP's logit_scale) into [1]: restore the shape.
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}
    save_file(arrays, tmp, metadata=dict(metadata or {"format": "pt"}))
    os.replace(tmp, path)
    return path
