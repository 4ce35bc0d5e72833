"""Property tests of the PyTorch-format converters (issue 23, docs/RELIABILITY.md).

Any damage to a ``save_pretrained`` folder — weight keys dropped, renamed, mis-shaped, extra, of
another dtype or holding NaN/Inf; a truncated or corrupt safetensors file or shard index; a
config.json with missing, extra or wrong-typed fields or an unknown class — either loads (when the
change is harmless: another float dtype, safetensors metadata, an unknown config field, a known
buffer) or raises jaxgen's own error (``WeightError`` / ``ConfigError``) whose message names the
key, field or file. Anything else — a KeyError, a safetensors or NumPy error, a Flax error from
building the module — fails the test.

Kept fast: three tiny models written once per module by diffusers / transformers
``save_pretrained`` (UNet2DModel, AutoencoderKL, CLIPTextModel); every example mutates a copy in a
temp dir and calls ``jaxgen.load_pretrained``, which reads the weights on the host and traces the
module for its parameter shapes (jax.eval_shape: nothing is compiled or run). Derandomized, no
example database, no deadline.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import jaxgen
from jaxgen.convert.config import freeze
from jaxgen.convert.pretrained import CLASSES
from jaxgen.convert.tables import flax_to_torch
from jaxgen.errors import ConfigError, WeightError

FAST = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
MANY = settings(FAST, max_examples=40)   # damaged files fail before the module is traced: cheap
MODELS = ("unet", "vae", "clip")


class Folder:
    """One tiny model's folder and what is known about it (a plain class: hypothesis prints it short)."""

    def __init__(self, path: str, module, params):
        self.path = path
        self.weights = next(f for f in os.listdir(path) if f.endswith(".safetensors"))  # its weight file
        self.state = load_file(os.path.join(path, self.weights))     # key -> np.ndarray, as stored
        with open(os.path.join(path, "config.json")) as f:
            self.config = json.load(f)
        self.class_key = "architectures" if "architectures" in self.config else "_class_name"
        self.ignore = tuple(type(module).pt_ignore)                   # regexes of known buffers
        self.shapes = _signature(params)                              # flat path -> (shape, dtype)
        # a known buffer in this file's own layout (transformers 5 drops the "text_model." prefix)
        self.buffer = next((k.replace("position_embedding.weight", "position_ids") for k in self.state
                            if k.endswith("position_embedding.weight")), "position_ids")

    def __repr__(self):
        return f"Folder({self.path!r})"


def _load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jaxgen.load_pretrained(folder)


def _signature(params) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): (tuple(v.shape), str(v.dtype)) for p, v in flat}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The three tiny models, each saved once by its PyTorch library (and loaded once as the reference)."""
    import diffusers
    import torch
    import transformers

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=2,
        sample_size=8).save_pretrained(root / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=12, projection_dim=8, bos_token_id=0, eos_token_id=2,
        pad_token_id=1)).save_pretrained(root / "clip")
    return {name: Folder(str(root / name), *_load(str(root / name))) for name in MODELS}


def _copy(folder: Folder, tmp: str) -> str:
    return shutil.copytree(folder.path, os.path.join(tmp, "model"))


def _ignored(folder: Folder, key: str) -> bool:
    return any(re.search(p, key) for p in folder.ignore)


def _check_loaded(folder: Folder, path: str, what) -> None:
    module, params = _load(path)
    assert _signature(params) == folder.shapes, what


# -- weight keys: dropped, renamed, mis-shaped, extra, dtype, NaN --------------------------------
KEY_KINDS = ("drop", "rename", "reshape", "extra", "dtype", "nonfinite", "metadata")


def _reshapes(shape: tuple) -> list[tuple]:
    out = [shape + (1,), (1,) + shape, tuple(shape[::-1]), shape[:-1], (int(np.prod(shape)),),
           tuple(d + 1 for d in shape)]
    return [s for s in out if s != shape]


@st.composite
def key_mutations(draw, folder: Folder):
    """1-3 changes to distinct keys of the state dict: (kind, key, argument)."""
    keys = sorted(folder.state)
    n = draw(st.integers(1, 3))
    chosen = draw(st.lists(st.sampled_from(keys), min_size=n, max_size=n, unique=True))
    out = []
    for key in chosen:
        kind = draw(st.sampled_from(KEY_KINDS))
        shape = folder.state[key].shape
        if kind == "rename":
            arg = draw(st.sampled_from([key + ".old", "module." + key, key.replace("weight", "kernel"),
                                        key.replace(".", "_"), key.upper(), key.split(".", 1)[-1]]))
            if arg == key or arg in folder.state:
                arg = key + "_renamed"
        elif kind == "reshape":
            arg = draw(st.sampled_from(_reshapes(shape)))
        elif kind == "extra":
            arg = (draw(st.sampled_from(["extra.weight", "down_blocks.9.resnets.0.conv1.bias", "lora_A.weight",
                                         key + "_extra", "num_batches_tracked", folder.buffer, ""])),
                   draw(st.sampled_from([(), (3,), (2, 2), (1, 12)])),
                   draw(st.sampled_from(["float32", "int64", "float16"])))
        elif kind == "dtype":
            arg = draw(st.sampled_from(["float16", "bfloat16", "float64", "int32", "int64", "uint8", "bool"]))
        elif kind == "nonfinite":
            arg = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        elif kind == "metadata":
            arg = draw(st.sampled_from([None, {"format": "np"}, {"format": "pt", "note": "x" * 300}, {}]))
        else:
            arg = None
        out.append((kind, key, arg))
    return out


def _apply_key_mutations(folder: Folder, mutations):
    """The mutated state dict and metadata, whether a load must fail, and the names its error must carry."""
    state = dict(folder.state)
    metadata = {"format": "pt"}
    harmful, culprits = False, []
    for kind, key, arg in mutations:
        value = state[key]
        floating = np.issubdtype(value.dtype, np.floating)
        if kind == "drop":
            del state[key]
            bad = not _ignored(folder, key)
            culprits += [key] if bad else []
        elif kind == "rename":
            state[arg] = state.pop(key)
            culprits += [k for k in (key, arg) if not _ignored(folder, k)]
            bad = bool(culprits)
        elif kind == "reshape":
            state[key] = np.zeros(arg, value.dtype)
            bad = not _ignored(folder, key)
            culprits += [key] if bad else []
        elif kind == "extra":
            name, shape, dtype = arg
            state[name] = np.zeros(shape, dtype)
            bad = not _ignored(folder, name)
            culprits += [name] if bad and name else []
        elif kind == "dtype":
            state[key] = value.astype(getattr(ml_dtypes, arg) if arg == "bfloat16" else arg)
            bad = not _ignored(folder, key) and floating and arg in ("int32", "int64", "uint8", "bool")
            culprits += [key] if bad else []
        elif kind == "nonfinite":
            if floating:
                value = value.copy()
                value.reshape(-1)[value.size // 2] = arg
                state[key] = value
            bad = floating and not _ignored(folder, key)
            culprits += [key] if bad else []
        else:  # metadata
            metadata, bad = arg, False
        harmful |= bad
    return state, metadata, harmful, culprits


@pytest.mark.parametrize("name", MODELS)
@FAST
@given(data=st.data())
def test_weight_keys_dropped_renamed_misshaped_extra(folders, name, data):
    folder = folders[name]
    mutations = data.draw(key_mutations(folder), label="mutations")
    state, metadata, harmful, culprits = _apply_key_mutations(folder, mutations)
    with tempfile.TemporaryDirectory() as tmp:
        path = _copy(folder, tmp)
        save_file(state, os.path.join(path, folder.weights), metadata=metadata)
        try:
            _check_loaded(folder, path, mutations)
        except WeightError as e:
            assert harmful, f"a harmless change {mutations} was refused: {e}"
            missing = [c for c in culprits if c not in str(e)]
            assert not missing, f"{mutations}: the error does not name {missing}: {e}"
            event("WeightError naming the keys")
            return
    assert not harmful, f"loaded despite {mutations}"
    event("loads")


@FAST
@given(name=st.sampled_from(MODELS), data=st.data())
def test_harmless_weight_changes_load_the_same_values(folders, name, data):
    """Another float dtype, other safetensors metadata, another key order, a known buffer: these load,
    and every parameter equals the stored value cast to float32."""
    folder = folders[name]
    keys = sorted(folder.state)
    recast = data.draw(st.dictionaries(st.sampled_from(keys), st.sampled_from(["float16", "bfloat16", "float64"]),
                                       max_size=4), label="recast")
    metadata = data.draw(st.sampled_from([None, {}, {"format": "np"}, {"format": "pt", "note": "é" * 50}]),
                         label="metadata")
    order = data.draw(st.permutations(keys), label="order")
    buffer = data.draw(st.booleans(), label="known buffer") and bool(folder.ignore)
    state = {}
    for k in order:
        v = folder.state[k]
        if k in recast and np.issubdtype(v.dtype, np.floating):
            v = v.astype(ml_dtypes.bfloat16 if recast[k] == "bfloat16" else recast[k])
        state[k] = v
    if buffer:
        state[folder.buffer] = np.arange(12, dtype=np.int64)[None]
    with tempfile.TemporaryDirectory() as tmp:
        path = _copy(folder, tmp)
        save_file(state, os.path.join(path, folder.weights), metadata=metadata)
        module, params = _load(path)
    back = flax_to_torch(jax.device_get(params), renames=module.pt_renames())
    for k, v in back.items():
        stored = state.get(k, state.get(k.split(".", 1)[-1]))   # transformers 5: no tower prefix
        assert v.dtype == np.float32 and np.array_equal(v, np.asarray(stored, np.float32)), k


# -- damaged weight files -----------------------------------------------------------------------
FILE_KINDS = ("truncate", "overwrite", "header_length", "header_text", "header_entry", "append",
              "empty", "delete", "directory", "rename", "pickle_only")


@st.composite
def file_damage(draw, folder: Folder, size: int):
    kind = draw(st.sampled_from(FILE_KINDS))
    if kind == "truncate":
        arg = draw(st.integers(0, size - 1))
    elif kind == "overwrite":
        arg = (draw(st.integers(0, size - 1)), draw(st.binary(min_size=1, max_size=16)))
    elif kind == "header_length":
        arg = draw(st.sampled_from([0, 1, 7, 8, size - 8, size, size + 1, 2 ** 31, 2 ** 63, 2 ** 64 - 1]))
    elif kind == "header_text":
        arg = draw(st.sampled_from([b"not json", b"[]", b'{"a": 1}', b"\xff\xfe\x00", b"{}", b'"x"',
                                    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                                    b'{"__metadata__": {"format": 5}}']))
    elif kind == "header_entry":
        key = draw(st.sampled_from(sorted(folder.state)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete"]))
        value = {"dtype": st.sampled_from(["F16", "F64", "I32", "BOOL", "U8", "BF16", "F8_E4M3", "XYZ", 5]),
                 "shape": st.one_of(st.lists(st.integers(-1, 40), max_size=4), st.sampled_from(["x", None])),
                 "data_offsets": st.one_of(st.lists(st.integers(-1, size), min_size=0, max_size=3),
                                           st.sampled_from(["x", None])),
                 "delete": st.none()}[field]
        arg = (key, field, draw(value))
    elif kind == "append":
        arg = draw(st.binary(min_size=1, max_size=64))
    elif kind == "rename":
        arg = draw(st.sampled_from(["model.safetensors", "diffusion_pytorch_model.safetensors",
                                    "weights.safetensors", "model.safetensors.bak"]))
    else:
        arg = None
    return kind, arg


def _damage(path: str, kind: str, arg) -> None:
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = data[8:8 + n], data[8 + n:]
    if kind == "truncate":
        data = data[:arg]
    elif kind == "overwrite":
        offset, junk = arg
        data = data[:offset] + junk + data[offset + len(junk):]
    elif kind == "header_length":
        data = struct.pack("<Q", arg) + data[8:]
    elif kind == "header_text":
        data = struct.pack("<Q", len(arg)) + arg + body
    elif kind == "header_entry":
        key, field, value = arg
        entries = json.loads(header)
        if field == "delete":
            del entries[key][value or "dtype"]
        else:
            entries[key][field] = value
        text = json.dumps(entries).encode()
        data = struct.pack("<Q", len(text)) + text + body
    elif kind == "append":
        data = data + arg
    elif kind == "empty":
        data = b""
    if kind in ("delete", "directory", "rename", "pickle_only"):
        os.remove(path)
        if kind == "directory":
            os.mkdir(path)
        elif kind == "rename":
            with open(os.path.join(os.path.dirname(path), arg), "wb") as f:
                f.write(data)
        elif kind == "pickle_only":
            with open(path.replace(".safetensors", ".bin"), "wb") as f:
                f.write(b"\x80\x02}q\x00.")
        return
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("name", MODELS)
@MANY
@given(data=st.data())
def test_damaged_weight_file(folders, name, data):
    folder = folders[name]
    size = os.path.getsize(os.path.join(folder.path, folder.weights))
    kind, arg = data.draw(file_damage(folder, size), label="damage")
    # must fail: the file is cut short, empty, gone, or its header is unreadable
    must_fail = kind in ("truncate", "header_length", "header_text", "empty", "delete", "directory",
                         "pickle_only") or (kind == "rename" and arg != folder.weights)
    names = [folder.weights]
    if kind == "header_entry":
        names.append(arg[0])   # a consistent header edit reaches the key check
    if kind == "pickle_only":
        names = [folder.weights.replace(".safetensors", ".bin")]
    with tempfile.TemporaryDirectory() as tmp:
        path = _copy(folder, tmp)
        _damage(os.path.join(path, folder.weights), kind, arg)
        try:
            _check_loaded(folder, path, (kind, arg))
        except WeightError as e:
            # bytes overwritten in the header can rename a key or change a shape consistently: then
            # the key check refuses the file and names the keys
            named = any(n in str(e) for n in names) or (kind == "overwrite" and "weights do not fit" in str(e))
            assert named, f"{kind} {arg!r}: the error names none of {names}: {e}"
            event(f"{kind}: WeightError")
            return
    assert not must_fail, f"loaded despite {kind} {arg!r}"
    event(f"{kind}: loads")


# -- sharded weights: a damaged shard index ----------------------------------------------------
@pytest.fixture(scope="module")
def sharded(folders, tmp_path_factory):
    """The UNet split in two shards plus an index, as diffusers writes large models."""
    folder = folders["unet"]
    path = str(tmp_path_factory.mktemp("sharded") / "unet")
    shutil.copytree(folder.path, path)
    os.remove(os.path.join(path, folder.weights))
    keys = sorted(folder.state)
    stem = folder.weights.replace(".safetensors", "")
    shards = [f"{stem}-0000{i}-of-00002.safetensors" for i in (1, 2)]
    weight_map = {k: shards[i * 2 // len(keys)] for i, k in enumerate(keys)}
    for shard in shards:
        save_file({k: folder.state[k] for k in keys if weight_map[k] == shard}, os.path.join(path, shard),
                  metadata={"format": "pt"})
    index = os.path.join(path, stem + ".safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    _check_loaded(folder, path, "sharded")
    return folder, path, os.path.basename(index), shards


INDEX_KINDS = ("weight_map_type", "value_type", "missing_shard", "drop_entry", "extra_entry", "move_entry",
               "not_json", "not_utf8", "top_level", "delete_shard", "empty_map", "metadata")


@MANY
@given(data=st.data())
def test_damaged_shard_index(sharded, data):
    folder, src, index_name, shards = sharded
    keys = sorted(folder.state)
    kind = data.draw(st.sampled_from(INDEX_KINDS), label="kind")
    key = data.draw(st.sampled_from(keys), label="key")
    odd = data.draw(st.sampled_from([None, 5, 2.5, [], ["x"], {"a": 1}, "", "x"]), label="odd value")
    with tempfile.TemporaryDirectory() as tmp:
        path = shutil.copytree(src, os.path.join(tmp, "model"))
        index_path = os.path.join(path, index_name)
        with open(index_path) as f:
            index = json.load(f)
        wm = index["weight_map"]
        names, must_fail = [index_name], True
        if kind == "weight_map_type":
            index["weight_map"] = odd
        elif kind == "value_type":
            wm[key] = odd
            names.append(key)
        elif kind == "missing_shard":
            wm[key] = "nope-00003-of-00003.safetensors"
            names.append(key)
        elif kind == "drop_entry":
            del wm[key]
            names.append(key)
        elif kind == "extra_entry":
            wm["extra.weight"] = shards[0]
            names.append("extra.weight")
        elif kind == "move_entry":
            wm[key] = shards[1] if wm[key] == shards[0] else shards[0]
            names.append(key)
        elif kind == "delete_shard":
            os.remove(os.path.join(path, shards[0]))
            names.append(shards[0])
        elif kind == "empty_map":
            index["weight_map"] = {}
        elif kind == "metadata":
            index["metadata"] = odd
            must_fail = False
        text = json.dumps(index)
        if kind == "not_json":
            text = text[: len(text) // 2]
        elif kind == "top_level":
            text = json.dumps([index])
        with open(index_path, "wb") as f:
            f.write(b"\xff\xfe" + text.encode() if kind == "not_utf8" else text.encode())
        try:
            _check_loaded(folder, path, (kind, key, odd))
        except WeightError as e:
            assert any(n in str(e) for n in names), f"{kind} {key} {odd!r}: the error names none of {names}: {e}"
            event(f"{kind}: WeightError")
            return
    assert not must_fail, f"loaded despite {kind} {key} {odd!r}"
    event(f"{kind}: loads")


# -- config.json: missing, extra, wrong-typed fields, unknown class --------------------------------
ODD_VALUES = st.one_of(
    st.sampled_from(["3", "", "silu", "DownBlock2D", 2.5, 0.0, 1e30, -1e-5, True, False, None, [], [8],
                     [1, 2], [8, 16, 32], ["DownBlock2D"], [None], {"a": 1}]),
    st.integers(-4, 70))
CLASS_VALUES = st.sampled_from(["FancyNet", "", "unet2dmodel", 5, None, [], ["UNet2DModel"], {"a": 1},
                                *sorted(CLASSES)])
CONFIG_KINDS = ("drop", "extra", "retype", "class", "metadata", "file")


@st.composite
def config_mutations(draw, folder: Folder):
    """One or two changes to config.json: (kind, field, value)."""
    fields = sorted(k for k in folder.config if not k.startswith("_") and k != "architectures")
    out = []
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(CONFIG_KINDS))
        if kind in ("drop", "retype"):
            out.append((kind, draw(st.sampled_from(fields)), draw(ODD_VALUES) if kind == "retype" else None))
        elif kind in ("extra", "metadata"):
            name = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10))
            name = ("_" if kind == "metadata" else "x_") + name
            out.append((kind, name, draw(st.one_of(ODD_VALUES, st.dictionaries(st.text(max_size=3), ODD_VALUES,
                                                                               max_size=2)))))
        elif kind == "class":
            value = draw(st.one_of(CLASS_VALUES, st.just("<delete>")))
            if folder.class_key == "architectures" and draw(st.booleans()):
                value = [value] if value != "<delete>" else []
            out.append((kind, folder.class_key, value))
        else:
            out.append((kind, "config.json", draw(st.sampled_from(
                ["truncate", "list", "string", "null", "not utf-8", "bom", "empty", "delete", "directory"]))))
    return out


def _write_config(path: str, cfg: dict, damage: str | None) -> None:
    text = json.dumps(cfg, indent=2).encode()
    target = os.path.join(path, "config.json")
    if damage in ("delete", "directory"):
        os.remove(target)
        if damage == "directory":
            os.mkdir(target)
        return
    text = {None: text, "truncate": text[: len(text) // 2], "list": b"[]", "string": b'"config"',
            "null": b"null", "not utf-8": b"\xff\xfe" + text, "bom": b"\xef\xbb\xbf" + text,
            "empty": b""}[damage]
    with open(target, "wb") as f:
        f.write(text)


@pytest.mark.parametrize("name", MODELS)
@FAST
@given(data=st.data())
def test_config_fields_missing_extra_wrong_typed(folders, name, data):
    folder = folders[name]
    mutations = data.draw(config_mutations(folder), label="mutations")
    cfg = dict(folder.config)
    damage, names, must_fail = None, [], False
    for kind, field, value in mutations:
        if kind == "drop":
            cfg.pop(field, None)
            names.append(field)
        elif kind in ("retype", "extra", "metadata"):
            cfg[field] = value
            names.append(field)
        elif kind == "class":
            if value == "<delete>":
                cfg.pop(field, None)
            else:
                cfg[field] = value
            names += [field, str(value), *(map(str, value) if isinstance(value, list) else ())]
            must_fail |= value != folder.config[field]
        else:
            damage = damage or value
    if damage:
        names, must_fail = ["config.json"], True
    with tempfile.TemporaryDirectory() as tmp:
        path = _copy(folder, tmp)
        _write_config(path, cfg, damage)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                module, params = jaxgen.load_pretrained(path)
            except ConfigError as e:
                # the field (or class) is named; or values of the right type build no model (a zero
                # size, groups that do not divide the channels): config.json and the failure are named
                built = "cannot be built from these config values" in str(e) and "config.json" in str(e)
                assert built or any(n in str(e) for n in names), f"{mutations}: the error names none of {names}: {e}"
                event("ConfigError: cannot be built" if built else "ConfigError naming the field")
                return
            except WeightError as e:
                # the config describes another architecture: the weights do not fit it (or, for a
                # class of the other library, the folder lacks that class's weight file)
                assert not damage and ("config.json" in str(e) or "no weights found" in str(e)), f"{mutations}: {e}"
                event("WeightError: another architecture")
                return
    assert not must_fail, f"loaded despite {mutations}"
    event("loads")
    assert _signature(params) == folder.shapes
    # what loads uses config.json as written: every field it sets, with the value it has there
    used = {k: getattr(module, k) for k in type(module).config_fields() if k in cfg}
    assert used == {k: freeze(cfg[k]) for k in used}, mutations
    for kind, field, value in mutations:   # an unknown field is ignored with a warning naming it
        if kind == "extra" and not (name == "clip" and field in ()):
            assert any(field in str(w.message) for w in caught), (field, [str(w.message) for w in caught])
