"""jaxgen.nn.clip against transformers' CLIP classes, both directions, float32, several configs.

Parity method (DESIGN.md section 6): build the transformers class with a tiny config, randomise
every weight, save_pretrained, jaxgen.load_pretrained, compare ||ours - ref|| / ||ref|| <= 1e-5;
and the reverse: randomised jaxgen params -> jaxgen.save_pretrained -> transformers
from_pretrained gives the same outputs.
"""
from __future__ import annotations

import functools
import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
import jaxgen
from jaxgen.errors import ConfigError, DataError, WeightError
from jaxgen.nn import clip as jclip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5

# Two architectures that differ in everything the issue lists: activation (quick_gelu / exact
# gelu), pooling rule (first eos_token_id, 49407-style / legacy eos_token_id == 2: argmax), projection
# size, head count and head size, depth, layer-norm epsilon, channel count.
CONFIGS = {
    "quick_gelu_eos": dict(
        text=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=16, projection_dim=12,
                  hidden_act="quick_gelu", bos_token_id=96, eos_token_id=97, pad_token_id=1),
        vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    image_size=16, patch_size=4, num_channels=3, projection_dim=12,
                    hidden_act="quick_gelu"),
        projection_dim=12),
    "gelu_legacy_eos2": dict(
        text=dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=12, projection_dim=16,
                  hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
                  layer_norm_eps=1e-6),
        vision=dict(hidden_size=24, intermediate_size=30, num_hidden_layers=3, num_attention_heads=6,
                    image_size=12, patch_size=6, num_channels=1, projection_dim=16,
                    hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=16),
}


def randomize_(model, seed: int):
    """Every parameter random (norm weights around 1), so no zero/one init hides a mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "norm" in name or "layrnorm" in name
            p.copy_(1.0 + 0.2 * noise if is_norm and name.endswith("weight") else 0.4 * noise)
    return model.eval()


def text_inputs(cfg: dict):
    """ids [3, L] with the end token placed so that the pooling rule matters; mask [3, L]."""
    t, length = cfg["text"], cfg["text"]["max_position_embeddings"]
    rng = np.random.RandomState(0)
    ids = rng.randint(3, t["vocab_size"] - 3, size=(3, length))
    ids[:, 0] = t["bos_token_id"]
    ends = [length // 2, length - 1, 3]
    if t["eos_token_id"] == 2:
        # legacy rule: the pooled position is the largest id, not the first id 2.
        top = t["vocab_size"] - 1
        for row, end in enumerate(ends):
            ids[row, end] = top
            ids[row, 1] = 2
    else:
        for row, end in enumerate(ends):
            ids[row, end:] = t["eos_token_id"]          # pad = eos: first occurrence is pooled
        ids[2, 4:] = 0                                   # pad with another id after the eos
        ids[0, 1] = t["vocab_size"] - 1                  # an added token above eos: argmax != eos
    mask = (np.arange(length)[None] <= np.asarray(ends)[:, None]).astype(np.int64)
    return ids, mask


def pixel_inputs(cfg: dict, n: int = 2):
    v = cfg["vision"]
    x = np.random.RandomState(1).randn(n, v["image_size"], v["image_size"], v["num_channels"])
    return x.astype(np.float32)                          # NHWC


def torch_config(cls_name: str, cfg: dict):
    if cls_name.startswith("CLIPText"):
        return transformers.CLIPTextConfig(**cfg["text"])
    if cls_name.startswith("CLIPVision"):
        return transformers.CLIPVisionConfig(**cfg["vision"])
    return transformers.CLIPConfig(text_config=cfg["text"], vision_config=cfg["vision"],
                                   projection_dim=cfg["projection_dim"])


def torch_outputs(model, cls_name: str, ids, mask, pixels) -> dict:
    pt_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())          # NHWC -> NCHW
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        if cls_name == "CLIPTextModel":
            r, rm = model(input_ids=ids_t), model(input_ids=ids_t, attention_mask=mask_t)
            return {"last_hidden_state": r.last_hidden_state, "pooler_output": r.pooler_output,
                    "masked_last_hidden_state": rm.last_hidden_state,
                    "masked_pooler_output": rm.pooler_output}
        if cls_name == "CLIPTextModelWithProjection":
            r, rm = model(input_ids=ids_t), model(input_ids=ids_t, attention_mask=mask_t)
            return {"last_hidden_state": r.last_hidden_state, "text_embeds": r.text_embeds,
                    "masked_text_embeds": rm.text_embeds}
        if cls_name == "CLIPVisionModel":
            r = model(pixel_values=pt_pixels)
            return {"last_hidden_state": r.last_hidden_state, "pooler_output": r.pooler_output}
        if cls_name == "CLIPVisionModelWithProjection":
            r = model(pixel_values=pt_pixels)
            return {"last_hidden_state": r.last_hidden_state, "image_embeds": r.image_embeds}
        r = model(input_ids=ids_t, pixel_values=pt_pixels, attention_mask=mask_t)
        return {"logits_per_image": r.logits_per_image, "logits_per_text": r.logits_per_text,
                "text_embeds": r.text_embeds, "image_embeds": r.image_embeds,
                "text_features": model.get_text_features(input_ids=ids_t).pooler_output,
                "image_features": model.get_image_features(pixel_values=pt_pixels).pooler_output}


@functools.lru_cache(maxsize=None)
def runner(cls_name: str, key: str):
    """One jitted program per (class, config) computing the outputs torch_outputs computes; the
    transformers->jaxgen and jaxgen->transformers tests share it (one compile per case)."""
    module = jaxgen_module(cls_name, CONFIGS[key])

    def run(params, ids, mask, pixels):
        v = {"params": params}
        if cls_name == "CLIPTextModel":
            o, om = module.apply(v, ids), module.apply(v, ids, mask)
            return {"last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output,
                    "masked_last_hidden_state": om.last_hidden_state,
                    "masked_pooler_output": om.pooler_output}
        if cls_name == "CLIPTextModelWithProjection":
            o, om = module.apply(v, ids), module.apply(v, ids, mask)
            return {"last_hidden_state": o.last_hidden_state, "text_embeds": o.text_embeds,
                    "masked_text_embeds": om.text_embeds}
        if cls_name == "CLIPVisionModel":
            o = module.apply(v, pixels)
            return {"last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output}
        if cls_name == "CLIPVisionModelWithProjection":
            o = module.apply(v, pixels)
            return {"last_hidden_state": o.last_hidden_state, "image_embeds": o.image_embeds}
        o = module.apply(v, ids, pixels, mask)
        return {"logits_per_image": o.logits_per_image, "logits_per_text": o.logits_per_text,
                "text_embeds": o.text_embeds, "image_embeds": o.image_embeds,
                "text_features": module.apply(v, ids, method="get_text_features"),
                "image_features": module.apply(v, pixels, method="get_image_features")}

    return module, jax.jit(run)


def jaxgen_module(cls_name: str, cfg: dict):
    if cls_name.startswith("CLIPText"):
        return getattr(jclip, cls_name)(**cfg["text"])
    if cls_name.startswith("CLIPVision"):
        return getattr(jclip, cls_name)(**cfg["vision"])
    return jclip.CLIPModel(text_config=cfg["text"], vision_config=cfg["vision"],
                           projection_dim=cfg["projection_dim"])


CLASSES = ["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModel",
           "CLIPVisionModelWithProjection", "CLIPModel"]
CASES = [(c, k) for k in CONFIGS for c in CLASSES]


@pytest.fixture(scope="module")
def torch_folders(tmp_path_factory):
    """(class, config) -> (folder written by transformers, randomised torch model)."""
    out = {}
    for seed, (cls_name, key) in enumerate(CASES):
        model = randomize_(getattr(transformers, cls_name)(torch_config(cls_name, CONFIGS[key])), seed)
        folder = tmp_path_factory.mktemp(f"{cls_name}_{key}")
        model.save_pretrained(str(folder))
        out[(cls_name, key)] = (str(folder), model)
    return out


@pytest.mark.parametrize("cls_name,key", CASES)
def test_transformers_to_jaxgen(torch_folders, cls_name, key):
    folder, model = torch_folders[(cls_name, key)]
    module, params = jaxgen.load_pretrained(folder)
    assert type(module).__name__ == cls_name
    cfg = CONFIGS[key]
    ids, mask = text_inputs(cfg)
    pixels = pixel_inputs(cfg)
    ref = torch_outputs(model, cls_name, ids, mask, pixels)
    expected, run = runner(cls_name, key)
    assert module.pt_config() == expected.pt_config()       # the same architecture, read back
    ours = run(params, ids, mask, pixels)
    errors = {name: rel_err(ours[name], ref[name]) for name in ref}
    assert max(errors.values()) <= TOL, errors


def random_params(module, seed: int):
    """Every parameter of ``module`` drawn at random on the host (no init compile)."""
    rng = np.random.RandomState(seed)
    shapes = module.abstract_params()
    return jax.tree_util.tree_map(lambda s: np.asarray(0.4 * rng.randn(*s.shape) + 0.1, np.float32), shapes)


@pytest.mark.parametrize("cls_name,key", CASES)
def test_jaxgen_to_transformers(tmp_path, cls_name, key):
    cfg = CONFIGS[key]
    module, run = runner(cls_name, key)
    params = random_params(module, 100 + CASES.index((cls_name, key)))
    jaxgen.save_pretrained(module, params, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [cls_name] and "dtype" not in config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls_name).from_pretrained(str(tmp_path)).eval()
    ids, mask = text_inputs(cfg)
    pixels = pixel_inputs(cfg)
    ref = torch_outputs(model, cls_name, ids, mask, pixels)
    ours = run(params, ids, mask, pixels)
    errors = {name: rel_err(ours[name], ref[name]) for name in ref}
    assert max(errors.values()) <= TOL, errors
    # and the folder loads back into jaxgen with identical parameters
    module2, params2 = jaxgen.load_pretrained(tmp_path)
    assert type(module2) is type(module) and module2.pt_config() == module.pt_config()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_param_tree_matches_state_dict(torch_folders):
    """jaxgen's parameter tree maps to exactly transformers' keys and shapes."""
    for key in CONFIGS:
        module = jaxgen_module("CLIPModel", CONFIGS[key])
        zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), module.abstract_params())
        ours = {k: v.shape for k, v in module.state_dict_from_params(zeros).items()}
        _, model = torch_folders[("CLIPModel", key)]
        ref = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        assert ours == ref


def test_init_from_scratch():
    """Training from scratch: init runs (jitted) and follows CLIP's initialisation scheme."""
    text = jclip.CLIPTextModel(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=8, eos_token_id=39)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in text.dummy_inputs()[0]]
    key = jax.random.key(0, impl="rbg")      # compiles faster on CPU than threefry; any key works
    params = jax.jit(lambda k: text.lazy_init(k, *shapes))(key)["params"]["text_model"]
    emb = params["embeddings"]["token_embedding"]["embedding"]
    assert 0.01 < float(jnp.std(emb)) < 0.03                          # normal(0.02)
    ln = params["final_layer_norm"]
    assert (ln["scale"] == 1).all() and (ln["bias"] == 0).all()
    assert (params["encoder"]["layers_0"]["mlp"]["fc1"]["bias"] == 0).all()
    # CLIPModel's temperature: only logit_scale is created when nothing but it is touched
    two = jclip.CLIPModel(text_config=dict(hidden_size=16, num_attention_heads=2),
                          vision_config=dict(hidden_size=16, num_attention_heads=2))
    scale = two.init(key, method=lambda m: m.logit_scale)["params"]
    assert list(scale) == ["logit_scale"] and float(scale["logit_scale"]) == pytest.approx(2.6592)


def test_unprefixed_single_tower_layout(torch_folders, tmp_path):
    """transformers 5 writes CLIPTextModel/CLIPVisionModel without the tower prefix; SD repos and
    transformers 4 write it with the prefix. Both load; jaxgen writes the prefixed layout."""
    from safetensors.numpy import load_file

    for cls_name, prefix in (("CLIPTextModel", "text_model."), ("CLIPVisionModel", "vision_model.")):
        folder, _ = torch_folders[(cls_name, "quick_gelu_eos")]
        assert not any(k.startswith(prefix) for k in load_file(f"{folder}/model.safetensors"))
        module, params = jaxgen.load_pretrained(folder)
        jaxgen.save_pretrained(module, params, tmp_path / cls_name)
        keys = load_file(str(tmp_path / cls_name / "model.safetensors"))
        assert all(k.startswith(prefix) for k in keys)


@pytest.fixture(scope="module")
def two_tower(torch_folders):
    folder, model = torch_folders[("CLIPModel", "quick_gelu_eos")]
    module, params = jaxgen.load_pretrained(folder)
    return module, params, model


def test_attention_impl_is_passed_to_the_kernel(two_tower, monkeypatch):
    module, params, _ = two_tower
    cfg = CONFIGS["quick_gelu_eos"]
    ids, mask = text_inputs(cfg)
    pixels = pixel_inputs(cfg)
    seen = []
    real = jclip.dot_product_attention

    def spy(*args, implementation, **kwargs):
        seen.append(implementation)
        return real(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jclip, "dot_product_attention", spy)
    auto = module.clone(attention_impl="auto")
    jax.eval_shape(lambda p: auto.apply({"params": p}, ids, pixels, mask), params)   # traces only
    layers = cfg["text"]["num_hidden_layers"] + cfg["vision"]["num_hidden_layers"]
    assert seen == ["auto"] * layers
    with pytest.raises(ConfigError, match="attention_impl"):
        module.clone(attention_impl="flash").apply({"params": params}, ids, method="get_text_features")


def test_bfloat16_compute(torch_folders, two_tower):
    """dtype=bfloat16: bf16 activations, float32 parameters, float32 CLIP logits."""
    folder, _ = torch_folders[("CLIPTextModelWithProjection", "gelu_legacy_eos2")]
    module, params = jaxgen.load_pretrained(folder)
    cfg = CONFIGS["gelu_legacy_eos2"]
    ids, mask = text_inputs(cfg)
    _, run = runner("CLIPTextModelWithProjection", "gelu_legacy_eos2")     # float32, compiled before
    ref = run(params, ids, mask, pixel_inputs(cfg))
    out = jax.jit(module.clone(dtype=jnp.bfloat16).apply)({"params": params}, ids)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert rel_err(out.text_embeds, ref["text_embeds"]) < 3e-2
    assert rel_err(out.last_hidden_state, ref["last_hidden_state"]) < 3e-2
    # the two-tower model, abstractly: bf16 towers, float32 logits, float32 parameters
    two, two_params, _ = two_tower
    bf16 = two.clone(dtype=jnp.bfloat16)
    cfg = CONFIGS["quick_gelu_eos"]
    shapes = jax.eval_shape(lambda p: bf16.apply({"params": p}, *text_inputs(cfg)[:1], pixel_inputs(cfg)),
                            two_params)
    assert shapes.text_model_output.last_hidden_state.dtype == jnp.bfloat16
    assert shapes.logits_per_image.dtype == jnp.float32
    args, _ = bf16.dummy_inputs()
    init_shapes = jax.eval_shape(lambda: bf16.init(jax.random.key(0), *args))["params"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(init_shapes)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("key", ["gelu_legacy_eos2"])
def test_scan_layers_is_exact_and_compiles_one_layer(torch_folders, key):
    """scan_layers=True: the same parameter tree (transformers' per-layer names), outputs equal to
    transformers, gradients equal to the unrolled encoder's, and one layer body in the program.
    One config keeps the suite short: its 3-layer vision tower is scanned, its 1-layer text tower
    takes the unrolled path."""
    folder, model = torch_folders[("CLIPModel", key)]
    module, params = jaxgen.load_pretrained(folder)
    scanned = module.clone(scan_layers=True)
    cfg = CONFIGS[key]
    ids, mask = text_inputs(cfg)
    pixels = pixel_inputs(cfg)
    ref = torch_outputs(model, "CLIPModel", ids, mask, pixels)
    v = {"params": params}
    out = jax.jit(lambda v: scanned.apply(v, ids, pixels, mask))(v)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        assert rel_err(getattr(out, name), ref[name]) <= TOL, name
    # initialisation stores the unrolled layout
    shapes = lambda m: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), m.abstract_params())
    assert shapes(scanned) == shapes(module)
    assert "layers_1" in scanned.abstract_params()["vision_model"]["encoder"]

    def loss(m):
        return lambda p: jnp.sum(m.apply({"params": p}, ids, pixels, mask).logits_per_image ** 2)

    g_loop, g_scan = (jax.jit(jax.grad(loss(m)))(params) for m in (module, scanned))
    for a, b in zip(jax.tree_util.tree_leaves(g_loop), jax.tree_util.tree_leaves(g_scan)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()) + 1e-7)
    # the program holds one encoder layer per tower: each layer's softmax has one exp, so the
    # unrolled program has one per layer and the scanned one one per tower (plus CLIPModel's exp of
    # logit_scale in both)
    count = lambda m: str(jax.make_jaxpr(lambda p: m.apply({"params": p}, ids, pixels))(params)).count(" exp ")
    layers = cfg["text"]["num_hidden_layers"] + cfg["vision"]["num_hidden_layers"]
    assert count(module) - count(scanned) == layers - 2 > 0


def test_scan_layers_names_missing_layers(two_tower):
    module, params, _ = two_tower
    broken = jax.tree_util.tree_map(lambda a: a, params)
    del broken["text_model"]["encoder"]["layers_0"]
    ids, _ = text_inputs(CONFIGS["quick_gelu_eos"])
    with pytest.raises(ConfigError, match="layers_0"):
        module.clone(scan_layers=True).apply({"params": broken}, ids, method="get_text_features")


def test_input_errors(two_tower):
    module, params, _ = two_tower
    cfg = CONFIGS["quick_gelu_eos"]
    ids, _ = text_inputs(cfg)
    pixels = pixel_inputs(cfg)
    with pytest.raises(DataError, match="NHWC"):
        module.apply({"params": params}, pixels.transpose(0, 3, 1, 2), method="get_image_features")
    too_long = np.zeros((1, cfg["text"]["max_position_embeddings"] + 1), np.int32)
    with pytest.raises(DataError, match="max_position_embeddings"):
        module.apply({"params": params}, too_long, method="get_text_features")


def test_config_errors_and_old_layouts(torch_folders, tmp_path):
    folder, _ = torch_folders[("CLIPModel", "quick_gelu_eos")]
    cfg = json.loads(open(f"{folder}/config.json").read())
    # old configs carry text_config_dict, which overrides text_config (as in transformers)
    old = dict(cfg, text_config_dict={"hidden_act": "gelu"})
    assert jclip.CLIPModel.from_pt_config(old).text_config["hidden_act"] == "gelu"
    bad = json.loads(json.dumps(cfg))
    bad["text_config"]["hidden_act"] = "swiglu"
    with pytest.raises(ConfigError, match="hidden_act"):
        jclip.CLIPModel.from_pt_config(bad)
    with pytest.raises(ConfigError, match="not divisible"):
        jclip.CLIPTextModel(hidden_size=30, num_attention_heads=4).init(
            jax.random.key(0), np.zeros((1, 4), np.int32))
    # weights that do not fit the config are a WeightError naming the key
    wrong = json.loads(json.dumps(cfg))
    wrong["projection_dim"] = 7
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(wrong))
    shutil.copy(f"{folder}/model.safetensors", tmp_path / "wrong" / "model.safetensors")
    with pytest.raises(WeightError, match="text_projection"):
        jaxgen.load_pretrained(tmp_path / "wrong")


def test_clip_pixel_values():
    images = np.random.RandomState(0).randint(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    x = jclip.clip_pixel_values(images)
    expect = (images / 255.0 - np.asarray(jclip.CLIP_MEAN)) / np.asarray(jclip.CLIP_STD)
    np.testing.assert_allclose(x, expect, rtol=1e-5, atol=1e-5)
    as_model_range = images.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(jclip.clip_pixel_values(as_model_range), x, rtol=1e-5, atol=1e-5)
    assert jclip.clip_pixel_values(images, image_size=16).shape == (2, 16, 16, 3)
