"""Scheduler properties, config handling, the sampling loop, and the pinned differences from
diffusers (configurations where diffusers gives NaN or raises and jaxgen stays finite)."""
from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from jaxgen.diffusion.sampling import guided_output, sample_loop
from jaxgen.diffusion.schedulers import SCHEDULERS, scheduler_from_config
from jaxgen.errors import ConfigError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers import nchw, nhwc, rel_err  # noqa: E402

SHAPE = (2, 4, 4, 3)


def _eager_loop(s, state, model, x):
    """The loop of sample_loop, step by step without compiling (deterministic schedulers)."""
    x = x * state.init_noise_sigma
    for i in map(jnp.int32, range(len(state.timesteps))):
        x, state = s.step(state, model(s.scale_model_input(state, x, i), state.timesteps[i], None), i, x)
    return x


def _x0():
    return jnp.asarray(np.random.RandomState(0).uniform(-1, 1, SHAPE).astype(np.float32))


def _noise(seed=1):
    return jnp.asarray(np.random.RandomState(seed).randn(*SHAPE).astype(np.float32))


# -- properties -------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    {"timestep_spacing": "leading"},
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"timestep_spacing": "linspace", "prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"},
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
])
def test_ddim_with_an_oracle_recovers_x0(cfg):
    """Deterministic DDIM fed the true noise of the current sample returns x0 exactly."""
    s = scheduler_from_config({"_class_name": "DDIMScheduler", "clip_sample": False, **cfg})
    state = s.set_timesteps(8)
    x0 = _x0()
    ac = s.alphas_cumprod

    def oracle(x_in, t, cond):
        a = ac[t]
        eps = (x_in - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        if s.prediction_type == "epsilon":
            return eps
        if s.prediction_type == "sample":
            return x0
        return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

    if cfg.get("rescale_betas_zero_snr"):
        # at alpha_bar = 0 the oracle's eps is undefined; the v oracle is -x0 there
        def oracle(x_in, t, cond, _inner=oracle):  # noqa: F811
            return jnp.where(ac[t] == 0, -x0, _inner(x_in, t, cond))
    out = _eager_loop(s, state, oracle, _noise())
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=2e-5)


@pytest.mark.parametrize("cfg", [
    {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3},
    {"_class_name": "UniPCMultistepScheduler", "solver_order": 3, "solver_type": "bh1",
     "final_sigmas_type": "sigma_min"},
])
def test_data_prediction_solvers_with_an_oracle_recover_x0(cfg):
    """With x0 fixed, x = alpha x0 + sigma eps0 (eps0 fixed) solves the ODE these solvers
    integrate exactly; fed the true x0 they follow it: x0 at sigma = 0, else alpha x0 + sigma eps0."""
    s = scheduler_from_config({**cfg, "prediction_type": "sample"})
    state = s.set_timesteps(10)
    x0, noise = np.asarray(_x0()), np.asarray(_noise())
    out = _eager_loop(s, state, lambda x_in, t, c: jnp.asarray(x0), jnp.asarray(noise))

    def alpha_sigma(sig):
        a = 1 / np.sqrt(sig**2 + 1)
        return a, sig * a

    a0, s0 = alpha_sigma(float(state.sigmas[0]))
    eps0 = (noise - a0 * x0) / s0
    aN, sN = alpha_sigma(float(state.sigmas[-1]))
    np.testing.assert_allclose(np.asarray(out), aN * x0 + sN * eps0, atol=5e-5)


def _random_configs():
    r = np.random.RandomState(123)
    spacing = ["linspace", "leading", "trailing"]
    out = []
    for name in sorted(SCHEDULERS):
        for _ in range(1):
            cfg = {"_class_name": name, "timestep_spacing": spacing[r.randint(3)],
                   "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"][r.randint(3)],
                   "steps_offset": int(r.randint(2))}
            if cfg["beta_schedule"] == "scaled_linear":
                cfg.update(beta_start=0.00085, beta_end=0.012)
            fields = SCHEDULERS[name]().config
            if "rescale_betas_zero_snr" in fields and r.rand() < 0.5:
                cfg.update(rescale_betas_zero_snr=True, prediction_type="v_prediction")
            if "use_karras_sigmas" in fields and r.rand() < 0.5:
                cfg.update(use_karras_sigmas=True)
            if "solver_order" in fields:
                cfg.update(solver_order=int(r.randint(1, 4)))
            if name == "DPMSolverMultistepScheduler":
                cfg.update(algorithm_type=["dpmsolver++", "sde-dpmsolver++", "dpmsolver"][r.randint(3)])
            if name == "UniPCMultistepScheduler":
                cfg.update(solver_type=["bh1", "bh2"][r.randint(2)], predict_x0=bool(r.randint(2)),
                           lower_order_final=bool(r.randint(2)))
            out.append((cfg, 10))
    return out


@pytest.mark.parametrize("case", _random_configs(), ids=lambda c: f"{c[0]['_class_name']}-{c[1]}")
def test_any_valid_config_gives_finite_samples(case):
    cfg, n = case
    s = scheduler_from_config(cfg)
    state = s.set_timesteps(n)
    x = _noise() * state.init_noise_sigma
    key = jax.random.key(0, impl="rbg")
    for i in map(jnp.int32, range(len(state.timesteps))):
        x_in = s.scale_model_input(state, x, i)
        out = jnp.tanh(x_in) + 0.1 * jnp.cos(jnp.asarray(state.timesteps[i], jnp.float32))
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape) if s.needs_noise() else None
        x, state = s.step(state, out, i, x, noise=noise)
    assert bool(jnp.all(jnp.isfinite(x))), cfg


# -- where diffusers fails: jaxgen's pinned behaviour -----------------------------------------
def _loop(s, state, model, x, noises=None):
    traj = []
    for i in map(jnp.int32, range(len(state.timesteps))):
        x_in = s.scale_model_input(state, x, i)
        x, state = s.step(state, model(x_in, state.timesteps[i]), i, x,
                          noise=None if noises is None else noises[int(i)])
        traj.append(np.asarray(x))
    return traj, state


def _model(x_in, t):
    return 0.9 * jnp.tanh(x_in) + 0.1


def _diffusers_loop(cfg, n, x, noises=None):
    ref = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    ref.set_timesteps(n)
    x = nchw(x)
    traj = []
    for k, t in enumerate(ref.timesteps):
        out = 0.9 * torch.tanh(x) + 0.1
        kw = {} if noises is None else {"variance_noise": nchw(noises[k])}
        x = ref.step(out, t, x, **kw).prev_sample
        traj.append(nhwc(x))
    return traj


def _alpha_sigma(sig):
    a = 1 / np.sqrt(sig**2 + 1)
    return a, sig * a


@pytest.mark.parametrize("fields", [
    {"solver_type": "bh1"}, {"predict_x0": False}, {"lower_order_final": False},
    {"lower_order_final": False, "solver_order": 3}, {"solver_type": "bh1", "predict_x0": False},
])
def test_unipc_final_step_to_sigma_zero_is_the_x0_limit(fields):
    """diffusers gives NaN / inf on the last step of these (or a singular-matrix error with
    lower_order_final=False, order 3); jaxgen's last step is first order and returns its exact
    limit, the x0 prediction. All earlier steps equal diffusers'."""
    cfg = {"_class_name": "UniPCMultistepScheduler", **fields}
    s = scheduler_from_config(cfg)
    state = s.set_timesteps(10)
    traj, final = _loop(s, state, _model, _noise())
    assert np.all(np.isfinite(traj[-1]))
    try:
        ref = _diffusers_loop(cfg, 10, _noise())
    except RuntimeError:          # torch.linalg.solve: singular matrix at the last step
        ref = None
    if ref is not None:
        assert not np.all(np.isfinite(ref[-1]))     # what this test is about
        for a, b in zip(traj[:-1], ref[:-1]):
            assert rel_err(a, b) <= 1e-5
    x9 = traj[-2]                                   # the sample the last step starts from
    eps = np.asarray(_model(jnp.asarray(x9), None))
    alpha, sigma = _alpha_sigma(float(state.sigmas[9]))
    assert float(state.sigmas[10]) == 0.0
    # predict_x0: the last data prediction; eps mode: the limit applied to the corrected sample
    start = x9 if s.predict_x0 else np.asarray(final.last_sample)
    np.testing.assert_allclose(traj[-1], (start - sigma * eps) / alpha, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["dpmsolver", "sde-dpmsolver"])
def test_dpmsolver_eps_variants_accept_a_zero_final_sigma(algorithm):
    """diffusers refuses final_sigmas_type='zero' for these; jaxgen's last step is the exact limit
    of the first-order update, and the earlier steps equal diffusers' sigma_min run."""
    with pytest.raises(ValueError, match="final_sigmas_type"):
        diffusers.DPMSolverMultistepScheduler(algorithm_type=algorithm)
    cfg = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": algorithm}
    s = scheduler_from_config(cfg)
    state = s.set_timesteps(10)
    noises = [_noise(10 + i) for i in range(10)]
    traj, _ = _loop(s, state, _model, _noise(), noises)
    assert np.all(np.isfinite(traj[-1]))
    ref = _diffusers_loop({**cfg, "final_sigmas_type": "sigma_min"}, 10, _noise(), noises)
    for a, b in zip(traj[:-1], ref[:-1]):
        assert rel_err(a, b) <= 1e-5
    alpha, sigma = _alpha_sigma(float(state.sigmas[9]))
    eps = np.asarray(_model(jnp.asarray(traj[-2]), None))
    if algorithm == "dpmsolver":
        expected = (traj[-2] - sigma * eps) / alpha
    else:
        expected = (traj[-2] - 2 * sigma * eps + sigma * np.asarray(noises[9])) / alpha
    np.testing.assert_allclose(traj[-1], expected, rtol=1e-5, atol=1e-5)


def test_ddpm_fixed_large_log_is_finite():
    """diffusers takes sqrt(log(beta)) (NaN); jaxgen uses exp(0.5 log beta), i.e. fixed_large."""
    noises = [_noise(10 + i) for i in range(10)]
    a = scheduler_from_config({"_class_name": "DDPMScheduler", "variance_type": "fixed_large_log"})
    b = a.replace(variance_type="fixed_large")
    ta, _ = _loop(a, a.set_timesteps(10), _model, _noise(), noises)
    tb, _ = _loop(b, b.set_timesteps(10), _model, _noise(), noises)
    np.testing.assert_allclose(np.stack(ta), np.stack(tb), rtol=1e-5, atol=1e-6)


def test_euler_ancestral_sample_prediction():
    """diffusers raises NotImplementedError; jaxgen treats the output as x0."""
    s = scheduler_from_config({"_class_name": "EulerAncestralDiscreteScheduler", "prediction_type": "sample"})
    state = s.set_timesteps(5)
    x, x0, z = _noise() * state.init_noise_sigma, _x0(), _noise(3)
    out, _ = s.step(state, x0, 0, x, noise=z)
    s0, s1 = float(state.sigmas[0]), float(state.sigmas[1])
    up = np.sqrt(s1**2 * (s0**2 - s1**2) / s0**2)
    down = np.sqrt(s1**2 - up**2)
    expected = np.asarray(x) + (np.asarray(x) - np.asarray(x0)) / s0 * (down - s0) + np.asarray(z) * up
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-4)


def test_refused_configurations():
    with pytest.raises(ConfigError, match="sde-dpmsolver"):
        scheduler_from_config({"_class_name": "DPMSolverMultistepScheduler",
                               "algorithm_type": "sde-dpmsolver", "solver_order": 3})
    s = scheduler_from_config({"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True,
                               "timestep_spacing": "trailing", "clip_sample": False})
    with pytest.raises(ConfigError, match="alpha_bar = 0"):
        s.set_timesteps(10)
    s.replace(timestep_spacing="leading").set_timesteps(10)   # never visits t = T-1: fine
    with pytest.raises(ConfigError, match="use_flow_sigmas"):
        scheduler_from_config({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True})
    with pytest.raises(ValueError, match="needs noise="):
        d = scheduler_from_config({"_class_name": "DDPMScheduler"})
        st = d.set_timesteps(3)
        d.step(st, _noise(), 0, _noise())
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler_from_config({"_class_name": "EulerDiscreteScheduler"}).set_timesteps(0)


# -- config handling --------------------------------------------------------------------------
def test_config_reading_is_tolerant():
    cfg = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.99.0", "beta_schedule": "scaled_linear",
           "beta_start": 0.00085, "beta_end": 0.012, "some_future_field": 3, "clip_sample": False}
    with pytest.warns(UserWarning, match="some_future_field"):
        s = jaxgen.scheduler_from_config(cfg)
    assert s.beta_schedule == "scaled_linear" and s.clip_sample is False
    with pytest.raises(ConfigError, match="beta_schedule='cosine'"):
        scheduler_from_config({"_class_name": "DDIMScheduler", "beta_schedule": "cosine"})
    with pytest.raises(ConfigError, match="_class_name"):
        scheduler_from_config({"beta_start": 0.1})
    with pytest.raises(ConfigError, match="KarrasVeScheduler"):
        scheduler_from_config({"_class_name": "KarrasVeScheduler"})


@pytest.mark.parametrize("target", sorted(SCHEDULERS))
def test_switching_class_like_diffusers(target):
    """OtherScheduler.from_config(ddim.config): other schedulers' fields drop silently and the
    fields written as defaults take the target's defaults (e.g. timestep_spacing)."""
    src = diffusers.DDIMScheduler.from_config(diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False).config)
    ref = getattr(diffusers, target).from_config(src.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = scheduler_from_config(dict(src.config), class_name=target)
    for k, v in ours.config.items():
        want = ref.config[k]
        assert (list(v) if isinstance(v, tuple) else v) == want, (k, v, want)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_to_config_round_trips_through_diffusers(name, tmp_path):
    s = SCHEDULERS[name]()
    path = s.save_config(tmp_path)
    assert os.path.basename(path) == "scheduler_config.json"
    ref = getattr(diffusers, name).from_pretrained(tmp_path)
    for k, v in s.config.items():
        assert (list(v) if isinstance(v, tuple) else v) == ref.config[k], k
    # and back: diffusers' own file, by folder path
    ref.save_config(tmp_path / "ref")
    assert scheduler_from_config(tmp_path / "ref") == s
    assert json.load(open(path))["_class_name"] == name


def test_legacy_values_are_rewritten_like_diffusers():
    s = scheduler_from_config({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "deis",
                               "solver_type": "logrho"})
    assert (s.algorithm_type, s.solver_type) == ("dpmsolver++", "midpoint")
    u = scheduler_from_config({"_class_name": "UniPCMultistepScheduler", "solver_type": "midpoint",
                               "disable_corrector": [1, 2]})
    assert u.solver_type == "bh2" and u.disable_corrector == (1, 2)


# -- add_noise --------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    {"_class_name": "DDPMScheduler"},
    {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True},
    {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
])
def test_add_noise_matches_diffusers(cfg):
    ref = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    ref.set_timesteps(10)
    s = scheduler_from_config(cfg)
    state = s.set_timesteps(10)
    t_ref = ref.timesteps[[2, 5]]
    x0, eps = _x0(), _noise()
    want = nhwc(ref.add_noise(nchw(x0), nchw(eps), t_ref))
    t = state.timesteps[jnp.asarray([2, 5])]
    got = s.add_noise(x0, eps, t) if cfg["_class_name"] == "DDPMScheduler" else s.add_noise(x0, eps, t, state=state)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    if cfg["_class_name"] != "DDPMScheduler":   # no state: the training sigma of integer t
        got0 = s.add_noise(x0, eps, jnp.asarray([100, 700]))
        assert got0.shape == x0.shape and bool(jnp.all(jnp.isfinite(got0)))


# -- the sampling loop ------------------------------------------------------------------------
def test_guidance_skips_the_unconditional_pass():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return jnp.zeros_like(x) + cond[:, None, None, None]

    x = jnp.zeros(SHAPE)
    cond, uncond = jnp.asarray([1.0, 2.0]), jnp.asarray([0.5, 0.5])
    out = guided_output(model, x, jnp.int32(3), cond, uncond, 1.0)
    assert calls == [2] and np.allclose(np.asarray(out)[:, 0, 0, 0], [1.0, 2.0])
    out = guided_output(model, x, jnp.int32(3), cond, uncond, 7.5)
    assert calls[-1] == 4
    np.testing.assert_allclose(np.asarray(out)[:, 0, 0, 0], 0.5 + 7.5 * (np.asarray([1.0, 2.0]) - 0.5))
    with pytest.raises(ValueError, match="uncond"):
        guided_output(model, x, jnp.int32(3), cond, None, 3.0)


def test_sample_loop_trajectory_start_index_and_keys():
    """Image-to-image use: start at index 2 from an add_noise sample; step i's noise comes from
    fold_in(key, i) with i the absolute index; the trajectory holds every step's sample."""
    s = scheduler_from_config({"_class_name": "DDIMScheduler", "clip_sample": False})
    state = s.set_timesteps(6)
    model = lambda x, t, c: 0.5 * x  # noqa: E731
    key = jax.random.key(0, impl="rbg")
    with pytest.raises(ValueError, match="key="):
        sample_loop(s, state, model, _noise(), step_kwargs={"eta": 0.5})
    x_start = s.add_noise(_x0(), _noise(), state.timesteps[2:3], state=state)
    out, traj = sample_loop(s, state, model, x_start, key=key, start_index=2, scale_init=False,
                            return_trajectory=True, step_kwargs={"eta": 0.5})
    assert traj.shape == (4,) + SHAPE
    x = x_start
    for i in map(jnp.int32, range(2, 6)):
        noise = jax.random.normal(jax.random.fold_in(key, i), SHAPE)
        x, state = s.step(state, model(s.scale_model_input(state, x, i), None, None), i, x,
                          noise=noise, eta=0.5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_traces_under_scan(name):
    """The state keeps its structure and dtypes through step, so the loop is one scan; checked by
    tracing (cheap) for each class with its buffers, a guided model and bf16 samples."""
    s = SCHEDULERS[name]()
    state = s.set_timesteps(5)
    key = jax.random.key(0, impl="rbg")

    def model(x, t, cond):
        return jnp.tanh(x) * cond[:, None, None, None].astype(x.dtype)

    def run(st, x):
        return sample_loop(s, st, model, x, key=key, cond=jnp.ones((2,)), uncond=jnp.zeros((2,)),
                           guidance_scale=3.0, return_trajectory=True)

    out, traj = jax.eval_shape(run, state, jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == SHAPE
    assert traj.shape == (len(state.timesteps),) + SHAPE
