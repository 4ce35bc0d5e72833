"""Layer-by-layer comparison of a PyTorch-format folder in jaxgen and in its PyTorch library.

``compare_folder(folder)`` loads the folder in both frameworks, runs both on the same random
inputs, and reports the relative error ‖ours − ref‖ / ‖ref‖ of the output and of every
submodule's output, in PyTorch's execution order, naming the first one that diverges. It is the
tool for checking a port and for finding a parity bug.

Submodules are paired by name: jaxgen's modules carry the PyTorch attribute names (a Linen
child ``down_blocks_0`` is PyTorch's ``down_blocks.0``, see jaxgen.convert.tables). Flax records
every submodule's ``__call__`` output (``capture_intermediates``); torch forward hooks record
PyTorch's. 4-D activations are compared NHWC. Needs torch and diffusers/transformers installed.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert import tables
from jaxgen.convert.config import read_json
from jaxgen.convert.pretrained import class_name_of, load_pretrained

TRANSFORMERS_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModel",
                        "CLIPVisionModelWithProjection", "CLIPModel")


@dataclasses.dataclass
class Row:
    name: str                # PyTorch module name ("" = the whole model's output)
    rel_error: float | None  # None: not comparable (shape differs or not captured on our side)
    shape: tuple
    note: str = ""


@dataclasses.dataclass
class Report:
    class_name: str
    rows: list[Row]
    tolerance: float

    @property
    def output_error(self) -> float:
        return self.rows[-1].rel_error

    @property
    def first_divergence(self) -> Row | None:
        """The first compared submodule (PyTorch execution order) above the tolerance."""
        for r in self.rows:
            if r.rel_error is not None and r.rel_error > self.tolerance:
                return r
        return None

    def format(self, max_rows: int | None = None) -> str:
        lines = [f"{self.class_name}: relative error per module (tolerance {self.tolerance:g})",
                 f"{'module':60s} {'rel. error':>11s}  shape"]
        rows = self.rows if max_rows is None else self.rows[:max_rows] + self.rows[-1:]
        for r in rows:
            err = "-" if r.rel_error is None else f"{r.rel_error:.2e}"
            flag = "  <-- first divergence" if r is self.first_divergence else ""
            lines.append(f"{(r.name or '<output>'):60s} {err:>11s}  {r.shape}{' ' + r.note if r.note else ''}{flag}")
        first = self.first_divergence
        lines.append(f"output: {self.output_error:.2e}; " + (f"first divergence: {first.name or '<output>'}"
                                                           if first else "no module above the tolerance"))
        return "\n".join(lines)


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(ours - ref) / (den if den > 0 else 1.0))


def _first_array(value):
    """The first array in a (nested) module output: tensors, tuples, dataclasses, ModelOutputs."""
    if value is None:
        return None
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    elif dataclasses.is_dataclass(value):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (list, tuple)):
        for v in value:
            a = _first_array(v)
            if a is not None:
                return a
    return None


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, np.float32)


def _nchw(x: np.ndarray):
    import torch

    x = torch.from_numpy(np.ascontiguousarray(x))
    return x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x


def _inputs(name: str, module, cfg: dict, rng: np.random.Generator, batch: int, size: int | None):
    """(jax args, jax kwargs, torch args, torch kwargs) of random inputs for class ``name``."""
    def image(channels, default):
        s = size or cfg.get("sample_size") or cfg.get("image_size") or default
        s = s[0] if isinstance(s, (list, tuple)) else s
        return rng.standard_normal((batch, s, s, channels)).astype(np.float32)

    if name in ("UNet2DModel", "UNet2DConditionModel"):
        n = len(cfg.get("block_out_channels", (1,)))
        x = image(cfg.get("in_channels", 4), 2 ** (n + 1))
        t = rng.integers(0, 1000, (batch,)).astype(np.int32)
        jkw, tkw = {}, {}
        if cfg.get("num_class_embeds"):
            labels = rng.integers(0, cfg["num_class_embeds"], (batch,)).astype(np.int32)
            jkw["class_labels"], tkw["class_labels"] = labels, _nchw(labels.astype(np.int64))
        if name == "UNet2DConditionModel":
            ctx = rng.standard_normal((batch, 8, cfg.get("cross_attention_dim", 1280))).astype(np.float32)
            return (x, t, ctx), jkw, (_nchw(x), _nchw(t.astype(np.int64)), _nchw(ctx)), tkw
        return (x, t), jkw, (_nchw(x), _nchw(t.astype(np.int64))), tkw
    if name in ("AutoencoderKL", "VQModel"):
        n = len(cfg.get("block_out_channels", (1,)))
        x = np.tanh(image(cfg.get("in_channels", 3), 2 ** (n + 1)))
        return (x,), {}, (_nchw(x),), {}
    if name.startswith("CLIPText") or name == "CLIPModel":
        text = cfg.get("text_config", cfg)
        ids = rng.integers(0, text.get("vocab_size", 49408) - 1, (batch, min(16, text.get("max_position_embeddings", 77)))).astype(np.int32)
        ids[:, -1] = text.get("eos_token_id", 2) if text.get("eos_token_id", 2) != 2 else ids.max() + 1
        ids = np.minimum(ids, text.get("vocab_size", 49408) - 1)
        if name == "CLIPModel":
            vis = cfg.get("vision_config", {})
            px = image(vis.get("num_channels", 3), vis.get("image_size", 224))
            return (), {"input_ids": ids, "pixel_values": px}, (), {"input_ids": _nchw(ids.astype(np.int64)),
                                                                     "pixel_values": _nchw(px)}
        return (ids,), {}, (_nchw(ids.astype(np.int64)),), {}
    if name.startswith("CLIPVision"):
        px = image(cfg.get("num_channels", 3), cfg.get("image_size", 224))
        return (px,), {}, (_nchw(px),), {}
    raise ValueError(f"compare: no input recipe for {name}")


def _torch_model(name: str, folder: str):
    import importlib

    lib = importlib.import_module("transformers" if name in TRANSFORMERS_CLASSES else "diffusers")
    model = getattr(lib, name).from_pretrained(folder)
    return model.float().eval()


def _flax_intermediates(tree, prefix=()) -> dict[str, Any]:
    """{'down_blocks.0.resnets.1': first output array} from Flax's 'intermediates' collection."""
    out = {}
    for key, value in tree.items():
        if key == "__call__":
            name = ".".join(tables._segment(s) for s in prefix)
            out.setdefault(name, _first_array(value))
        elif isinstance(value, dict):
            out.update(_flax_intermediates(value, prefix + (key,)))
    return out


def compare_folder(folder: str | os.PathLike, *, seed: int = 0, batch: int = 2, size: int | None = None,
                   tolerance: float = 1e-5, params: Any = None) -> Report:
    """Run ``folder``'s model in jaxgen and PyTorch on the same random inputs; see the module doc.

    size: spatial size of image inputs (default: the config's sample_size / image_size).
    params: jaxgen parameters to check instead of the folder's own (e.g. from your own converter).
    """
    import torch

    folder = os.fspath(folder)
    cfg = read_json(os.path.join(folder, "config.json"))
    name = class_name_of(cfg, folder)
    module, loaded = load_pretrained(folder)
    params = loaded if params is None else params
    rng = np.random.default_rng(seed)
    jargs, jkw, targs, tkw = _inputs(name, module, cfg, rng, batch, size)

    with jax.default_matmul_precision("highest"):
        out, state = module.apply({"params": params}, *map(jnp.asarray, jargs),
                                  **{k: jnp.asarray(v) for k, v in jkw.items()},
                                  capture_intermediates=True, mutable=["intermediates"])
    ours = {k: v for k, v in _flax_intermediates(state["intermediates"]).items() if v is not None}
    ours_out = _first_array(out)

    model = _torch_model(name, folder)
    captured: dict[str, Any] = {}
    order: list[str] = []

    def hook(mod_name):
        def fn(_module, _inputs, output):
            if mod_name not in captured:
                captured[mod_name] = _first_array(output)
                order.append(mod_name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        ref_out = _first_array(model(*targs, **tkw))
    for h in handles:
        h.remove()

    rows = []
    for n in order:
        ref = captured[n]
        if ref is None:
            continue
        ref = _to_numpy(ref)
        if ref.ndim == 4:
            ref = ref.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        mine = ours.get(n)
        if mine is None:
            rows.append(Row(n, None, ref.shape, "(no jaxgen module of this name)"))
            continue
        mine = np.asarray(mine, np.float32)
        # some PyTorch modules work channels-first on [B, C, L] sequences (diffusers' attention
        # group norm): compare those against our [B, L, C] transposed
        candidates = [(ref, "")]
        if ref.ndim == 3:
            candidates.append((ref.transpose(0, 2, 1), "(as [B, L, C])"))
        errors = [(_rel(mine, r), note) for r, note in candidates if r.shape == mine.shape]
        if not errors:
            rows.append(Row(n, None, ref.shape, f"(jaxgen shape {mine.shape})"))
            continue
        err, note = min(errors)
        rows.append(Row(n, err, ref.shape, note))
    ref_out = _to_numpy(ref_out)
    if ref_out.ndim == 4:
        ref_out = ref_out.transpose(0, 2, 3, 1)
    rows.append(Row("", _rel(np.asarray(ours_out, np.float32), ref_out), ref_out.shape))
    return Report(name, rows, tolerance)
