"""Weight I/O: the key rule against real torch modules, strict checks, files and folders."""
import json
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxgen
from jaxgen.convert import tables
from jaxgen.convert.config import filter_config, module_fields, read_json
from jaxgen.convert.safetensors_io import read_weights, write_weights
from jaxgen.errors import ConfigError, WeightError
from jaxgen.nn.autoencoder import ConvAutoencoder, DenseAutoencoder


class TorchToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 8, eps=1e-5)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
        self.linear_1 = torch.nn.Linear(8, 5, bias=False)
        self.embed = torch.nn.Embedding(10, 8)

    def forward(self, x, label):  # x: NCHW
        h = self.norm(self.conv_in(x)).mean((2, 3)) + self.embed(label)
        for b in self.blocks:
            h = torch.nn.functional.silu(b(h))
        return self.linear_1(h)


class FlaxToy(nn.Module):
    @nn.compact
    def __call__(self, x, label):  # x: NHWC
        h = nn.Conv(8, (3, 3), padding=1, name="conv_in")(x)
        h = nn.GroupNorm(4, epsilon=1e-5, use_fast_variance=False, name="norm")(h).mean((1, 2))
        h = h + nn.Embed(10, 8, name="embed")(label)
        for i in range(2):
            h = nn.silu(nn.Dense(8, name=f"blocks_{i}")(h))
        return nn.Dense(5, use_bias=False, name="linear_1")(h)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    tm = TorchToy().eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0, 0.5)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    label = np.array([1, 7])
    with torch.no_grad():
        ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(label)).numpy()
    fm = FlaxToy()
    abstract = jax.eval_shape(lambda: fm.init(jax.random.key(0), x, label))["params"]
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    return fm, abstract, state, x, label, ref


def test_rule_matches_torch_modules(toy):
    fm, abstract, state, x, label, ref = toy
    params = tables.torch_to_flax(state, abstract)
    out = fm.apply({"params": params}, x, label)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5
    back = tables.flax_to_torch(params)
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])


def test_missing_unexpected_misshaped_are_named(toy):
    fm, abstract, state, *_ = toy
    bad = dict(state)
    del bad["blocks.1.bias"]
    bad["extra.weight"] = np.zeros(3, np.float32)
    bad["conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
    with pytest.raises(WeightError) as e:
        tables.torch_to_flax(bad, abstract, owner="FlaxToy")
    msg = str(e.value)
    assert "blocks.1.bias" in msg and "extra.weight" in msg and "conv_in.weight" in msg
    # known buffers can be ignored explicitly, nothing else
    ok = dict(state, **{"position_ids": np.arange(3)})
    tables.torch_to_flax(ok, abstract, ignore=(r"^position_ids$",))


def test_safetensors_folder_single_and_sharded(tmp_path, toy):
    _, _, state, *_ = toy
    write_weights(str(tmp_path / "single"), "model", state)
    got = read_weights(str(tmp_path / "single"), ("model",))
    assert set(got) == set(state)
    # sharded: two files + index
    keys = sorted(state)
    shard = tmp_path / "sharded"
    write_weights(str(shard), "model-00001-of-00002", {k: state[k] for k in keys[:3]})
    write_weights(str(shard), "model-00002-of-00002", {k: state[k] for k in keys[3:]})
    wm = {k: ("model-00001-of-00002.safetensors" if i < 3 else "model-00002-of-00002.safetensors")
          for i, k in enumerate(keys)}
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    got = read_weights(str(shard), ("model",))
    for k in keys:
        np.testing.assert_array_equal(got[k], state[k])


def test_truncated_file_and_pickle_refused(tmp_path, toy):
    _, _, state, *_ = toy
    path = write_weights(str(tmp_path / "t"), "model", state)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(WeightError, match="truncated or corrupt"):
        read_weights(str(tmp_path / "t"), ("model",))
    pk = tmp_path / "p"
    pk.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pk / "pytorch_model.bin")
    with pytest.raises(WeightError, match="allow_pickle=True"):
        read_weights(str(pk), ("model",))
    got = read_weights(str(pk), ("model",), allow_pickle=True)
    np.testing.assert_array_equal(got["conv_in.weight"], state["conv_in.weight"])
    with pytest.raises(WeightError, match="no weights found"):
        read_weights(str(tmp_path), ("model",))


def test_tolerant_config_reading():
    fields = module_fields(ConvAutoencoder)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = filter_config({"_class_name": "ConvAutoencoder", "_diffusers_version": "9.9",
                             "_use_default_values": ["act"], "latent_dim": 3, "channels": [8, 16],
                             "from_the_future": 1}, fields, owner="ConvAutoencoder",
                            supported={"act": ("relu", "silu")})
    assert out == {"latent_dim": 3, "channels": (8, 16)}
    assert any("from_the_future" in str(x.message) for x in w)
    with pytest.raises(ConfigError, match="act='swish'"):
        filter_config({"act": "swish"}, fields, owner="X", supported={"act": ("relu", "silu")})


def test_save_load_pretrained_roundtrip(tmp_path):
    for module in (ConvAutoencoder(channels=(8, 16), hidden_dim=16, skip=True), DenseAutoencoder(hidden_dims=(16,))):
        x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (3, 8, 8, 1)), jnp.float32)
        params = module.init(jax.random.key(3), x)["params"]
        folder = jaxgen.save_pretrained(module, params, tmp_path / type(module).__name__)
        cfg = read_json(os.path.join(folder, "config.json"))
        assert cfg["_class_name"] == type(module).__name__
        loaded, p2 = jaxgen.load_pretrained(folder)
        assert loaded == module
        np.testing.assert_array_equal(module.apply({"params": params}, x)[0], loaded.apply({"params": p2}, x)[0])


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        jaxgen.load_pretrained(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"_class_name": "FancyNet"}')
    with pytest.raises(ConfigError, match="FancyNet"):
        jaxgen.load_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text('{"_class_name": ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        jaxgen.load_pretrained(tmp_path / "a")
    # weights that do not fit the config: a mis-keyed file
    m = ConvAutoencoder(channels=(8, 16), hidden_dim=16)
    params = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    folder = jaxgen.save_pretrained(m, params, tmp_path / "b")
    state = read_weights(folder, ("model",))
    state["to_code.weight_renamed"] = state.pop("to_code.weight")
    write_weights(folder, "model", state)
    with pytest.raises(WeightError, match="to_code.weight"):
        jaxgen.load_pretrained(folder)
