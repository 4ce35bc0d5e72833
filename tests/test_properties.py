"""Property tests at jaxgen's boundaries (docs/RELIABILITY.md): for any input, a call either works
(and its output has the documented shape, dtype and range) or raises jaxgen's own error type
(JaxgenError) naming the field. Anything else — a NumPy or JAX error, an IndexError, a silent NaN —
fails the test.

Kept fast: few examples, deterministic (derandomize), no example database, no deadline, a tiny
model that is initialised (never trained) once per module.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from jaxgen.diffusion.schedulers import SCHEDULERS
from jaxgen.errors import ConfigError, DataError, JaxgenError

FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def names_a_field(error: BaseException, fields) -> bool:
    return any(f in str(error) for f in fields)


# -- schedulers: any config, any step count ----------------------------------------------------
SCHEDULER_NAMES = sorted(SCHEDULERS)


FLOATS = st.one_of(st.floats(1e-5, 0.05), st.sampled_from([0.0, -0.01, 1.0, 2.0, float("nan"), float("inf")]))


@st.composite
def scheduler_configs(draw):
    cfg = {"_class_name": draw(st.sampled_from(SCHEDULER_NAMES))}
    optional = {
        "num_train_timesteps": st.one_of(st.integers(1, 1500), st.sampled_from([0, -5])),
        "beta_start": FLOATS, "beta_end": FLOATS,
        "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "nope"]),
        "prediction_type": st.sampled_from(["epsilon", "v_prediction", "sample", "flow", ""]),
        "timestep_spacing": st.sampled_from(["leading", "trailing", "linspace", "karras", "middle"]),
        "steps_offset": st.integers(-2, 3),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            cfg[key] = draw(strategy)
    return cfg


@FAST
@given(cfg=scheduler_configs(), steps=st.one_of(st.integers(-3, 1600), st.sampled_from([2.5, True, None, "10"])))
def test_any_scheduler_config_and_step_count(cfg, steps):
    import jax.numpy as jnp

    from jaxgen.diffusion.schedulers import scheduler_from_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            s = scheduler_from_config(cfg)
            state = s.set_timesteps(steps)
        except JaxgenError as e:
            assert names_a_field(e, [*cfg, "num_inference_steps", "beta", "scheduler"]), str(e)
            return
    T = s.num_train_timesteps
    ts = np.asarray(state.timesteps)
    assert isinstance(steps, int) and 1 <= steps <= T
    assert ts.ndim == 1 and len(ts) >= 1 and ((ts >= 0) & (ts < T)).all(), ts
    x = jnp.ones((1, 2, 2, 1), jnp.float32)
    state = s.with_buffers(state, x)
    x_in = s.scale_model_input(state, x * state.init_noise_sigma, 0)
    out, _ = s.step(state, jnp.zeros_like(x), 0, x_in, noise=jnp.zeros_like(x))
    assert out.shape == x.shape and bool(jnp.isfinite(out).all()), (cfg, steps)


# -- the tokenizer: any Unicode, any length ----------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from jaxgen.tokenizer import train_tokenizer

    return train_tokenizer(["a red circle on the left", "a small blue square", "ünïcode 文字 😀"] * 3,
                           vocab_size=530)


@FAST
@given(texts=st.lists(st.one_of(st.text(max_size=400), st.binary(max_size=40), st.integers(), st.none()),
                      min_size=1, max_size=3))
def test_tokenizer_any_text(tokenizer, texts):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ids = tokenizer(texts)
        except DataError as e:
            assert "text" in str(e)
            assert not all(isinstance(t, str) for t in texts), texts
            return
    assert ids.shape == (len(texts), 77) and ids.dtype == np.int32
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert ((ids == tokenizer.eos_token_id).sum(axis=1) >= 1).all()
    assert ((ids >= 0) & (ids < tokenizer.vocab_size)).all()
    texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    longest = max(len(tokenizer.tokenize(t)) for t in texts)
    truncated = [w for w in caught if "were dropped" in str(w.message)]
    assert bool(truncated) == (longest > 75), (longest, [str(w.message) for w in caught])


# -- image arrays at the Run boundary ----------------------------------------------------------
@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """An initialised (untrained) tiny digits autoencoder as a Run: images uint8 [N, 8, 8, 1]."""
    import jax

    from configs.digits_ae import get_config
    from jaxgen.training.run import Run
    from jaxgen.training.tasks import make_task

    config = get_config("tiny")
    task = make_task(config)
    params = task.init_params(jax.random.key(0), task.example_batch())
    return Run(config=config, task=task, params=params, step=0, workdir=str(tmp_path_factory.mktemp("ae")))


DTYPES = [np.uint8, np.int64, np.float32, np.float64, np.bool_]


@st.composite
def image_arrays(draw, good_hw=(8, 8), channels=(1,)):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 3))
    h, w = good_hw if draw(st.booleans()) else (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    c = draw(st.sampled_from([*channels, 3, 4]))
    shape = draw(st.sampled_from([(n, h, w, c), (n, h, w), (h, w, c), (n, c, h, w), (n, 1, h, w, c)]))
    if dtype == np.uint8:
        x = np.asarray(draw(st.integers(0, 255)), np.uint8) * np.ones(shape, np.uint8)
    elif dtype == np.bool_:
        x = np.ones(shape, bool)
    elif dtype == np.int64:
        x = np.full(shape, draw(st.sampled_from([0, 7, -3, 300])), dtype)
    else:
        value = draw(st.sampled_from([0.0, 0.5, 1.0, -1.0, 300.0, float("nan"), float("inf")]))
        x = np.full(shape, value, dtype)
    return x


@FAST
@given(x=image_arrays())
def test_run_takes_any_image_array(ae_run, x):
    try:
        out = ae_run.reconstruct(x)
    except DataError as e:
        assert "'image'" in str(e), str(e)
        ok = x.dtype == np.uint8 and x.ndim in (3, 4) and x.shape[1:3] == (8, 8) and len(x) > 0 \
            and (x.ndim == 3 or x.shape[3] == 1)
        assert not ok, (x.dtype, x.shape, str(e))
        return
    assert x.dtype == np.uint8 and len(x) > 0
    assert out.dtype == np.uint8 and out.shape == (len(x), 8, 8, 1)


@FAST
@given(num=st.one_of(st.integers(-2, 3), st.sampled_from([1.5, True, "2", None])))
def test_run_sample_counts(ae_run, num):
    try:
        out = ae_run.decode_random_codes(num)
    except DataError as e:
        assert "num=" in str(e)
        assert not (isinstance(num, int) and not isinstance(num, bool) and num >= 1)
        return
    assert out.shape == (num, 8, 8, 1) and out.dtype == np.uint8


def test_nan_parameters_are_an_error_at_the_run_boundary(ae_run):
    import jax

    from jaxgen.errors import NonFiniteError

    nan = jax.tree_util.tree_map(lambda p: p * np.nan, ae_run.params)
    bad = dataclasses.replace(ae_run, params=nan, raw_params=nan, variables=None)
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        bad.reconstruct(np.zeros((2, 8, 8, 1), np.uint8))


# -- image arrays at the pipeline boundary ------------------------------------------------------
@FAST
@given(x=image_arrays(good_hw=(8, 8), channels=(3,)))
def test_pipeline_takes_any_image_array(x):
    from jaxgen.pipelines.stable_diffusion import as_images

    try:
        out = as_images(x, "image")
    except DataError as e:
        assert str(e).startswith("image:"), str(e)
        return
    assert out.dtype == np.float32 and out.ndim == 4 and out.shape[-1] == 3 and out.size > 0
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@FAST
@given(m=image_arrays(good_hw=(8, 8), channels=(1,)))
def test_pipeline_takes_any_mask_array(m):
    from jaxgen.pipelines.stable_diffusion import _as_masks

    assume(m.ndim <= 4)
    try:
        out = _as_masks(m, "mask_image")
    except DataError as e:
        assert str(e).startswith("mask_image:"), str(e)
        return
    assert out.dtype == np.float32 and out.ndim == 4 and out.shape[-1] == 1 and out.size > 0
    assert set(np.unique(out)) <= {0.0, 1.0}


# -- sampling arguments --------------------------------------------------------------------------
@FAST
@given(g=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["x", None])))
def test_guidance_scale_values(g):
    from jaxgen.training.config_values import check_guidance

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = check_guidance(g, "rule")
        except ConfigError as e:
            assert "guidance_scale" in str(e)
            assert not (isinstance(g, float) and np.isfinite(g))
            return
    assert np.isfinite(out) and out == g
    assert bool(caught) == (g < 0)
