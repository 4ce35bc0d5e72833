"""Step-for-step parity of jaxgen's schedulers with diffusers' PyTorch schedulers.

Both run a whole sampling loop from the same initial noise, driven by the same deterministic
stand-in model (evaluated by each side on its own sample) and the same injected variance noise
(diffusers' ``randn_tensor`` is patched to hand out the step's noise). Checked: the timestep
ladder, init_noise_sigma, and every step's sample to 1e-5 relative (||ours - ref|| / ||ref||).
Most configurations run jaxgen's step eagerly; a few run the compiled lax.scan loop
(jaxgen.diffusion.sampling.sample_loop) with the noise it draws itself.
"""
from __future__ import annotations

import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxgen.diffusion.sampling import sample_loop  # noqa: E402
from jaxgen.diffusion.schedulers import scheduler_from_config  # noqa: E402
from helpers import nchw, nhwc, rel_errors  # noqa: E402

SHAPE = (2, 4, 4, 3)          # NHWC; diffusers sees NCHW
TOL = 1e-5


def _stand_in(xp, x, t, phase, head):
    """Deterministic model: 0.9 tanh(x) + 0.2 sin(t / 97 + phase) (+ a variance head)."""
    if xp is torch:
        t = torch.as_tensor(t, dtype=torch.float32)
        out = 0.9 * torch.tanh(x) + 0.2 * torch.sin(t / 97.0 + phase)
        if head == "learned_range":
            return torch.cat([out, torch.tanh(0.5 * x + 0.3)], 1)
        if head == "learned":
            return torch.cat([out, 0.01 + 0.5 * torch.sigmoid(x)], 1)
        return out
    t = jnp.asarray(t, jnp.float32)
    out = 0.9 * jnp.tanh(x) + 0.2 * jnp.sin(t / 97.0 + phase)
    if head == "learned_range":
        return jnp.concatenate([out, jnp.tanh(0.5 * x + 0.3)], -1)
    if head == "learned":
        return jnp.concatenate([out, 0.01 + 0.5 * jax.nn.sigmoid(x)], -1)
    return out


def run_diffusers(cfg, n, init, phase, noises, step_kwargs=None, head=None):
    """diffusers' loop. noises[k]: NHWC noise of step k. Returns (timesteps, init_sigma, traj)."""
    step_kwargs = dict(step_kwargs or {})
    name = cfg["_class_name"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, name).from_config(cfg)
    ref.set_timesteps(n)
    module = sys.modules[type(ref).__module__]
    current = [0]

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return nchw(noises[current[0]]).to(dtype or torch.float32)

    original = getattr(module, "randn_tensor", None)
    if original is not None:
        module.randn_tensor = fake_randn
    try:
        x = nchw(init) * ref.init_noise_sigma
        phase_t = nchw(phase[None])[0]
        traj = []
        for k, t in enumerate(ref.timesteps):
            current[0] = k
            x_in = ref.scale_model_input(x, t)
            out = _stand_in(torch, x_in, t, phase_t, head)
            kw = dict(step_kwargs)
            if name == "DDIMScheduler" and kw.get("eta", 0) > 0:
                kw["variance_noise"] = nchw(noises[k])
            x = ref.step(out, t, x, **kw).prev_sample
            traj.append(nhwc(x))
    finally:
        if original is not None:
            module.randn_tensor = original
    return ref.timesteps.numpy(), float(ref.init_noise_sigma), np.stack(traj)


def run_jaxgen_eager(cfg, n, init, phase, noises, step_kwargs=None, head=None):
    step_kwargs = dict(step_kwargs or {})
    s = scheduler_from_config(cfg)
    state = s.set_timesteps(n)
    x = jnp.asarray(init) * state.init_noise_sigma
    needs = s.needs_noise(**step_kwargs)
    traj = []
    for k in range(len(state.timesteps)):
        i = jnp.int32(k)   # an array index: jax compiles one gather for all steps
        x_in = s.scale_model_input(state, x, i)
        out = _stand_in(jnp, x_in, state.timesteps[i], phase, head)
        x, state = s.step(state, out, i, x, noise=jnp.asarray(noises[k]) if needs else None,
                          **step_kwargs)
        traj.append(np.asarray(x))
    return np.asarray(state.timesteps), float(state.init_noise_sigma), np.stack(traj)


def assert_same_ladder(ts, ref_ts):
    """Integer ladders are equal; fractional ones (timesteps read back from Karras / exponential /
    beta sigmas) agree to float32 rounding: torch's CPU float32 sqrt is not correctly rounded
    (1 ulp off on about a fifth of inputs), so its sigma tables differ from jaxgen's by an ulp."""
    assert ts.shape == ref_ts.shape
    if np.issubdtype(ref_ts.dtype, np.integer):
        np.testing.assert_array_equal(ts.astype(np.int64), ref_ts)
    else:
        np.testing.assert_allclose(ts, ref_ts, rtol=1e-6, atol=0)


def inputs(seed, n_noise):
    r = np.random.RandomState(seed)
    init = r.randn(*SHAPE).astype(np.float32)
    phase = r.uniform(0, 2 * np.pi, SHAPE[1:]).astype(np.float32)
    noises = r.randn(n_noise, *SHAPE).astype(np.float32)
    return init, phase, noises


def _c(name, **fields):
    return {"_class_name": name, **fields}


SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
          timestep_spacing="leading")
ZSNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")

# (config, num_inference_steps, step kwargs, model head). Mostly 10 steps: eager JAX compiles
# each primitive once per shape, so a shared ladder length keeps this file fast.
CASES = [
    # DDPM
    (_c("DDPMScheduler"), 10, None, None),
    (_c("DDPMScheduler", variance_type="fixed_large", timestep_spacing="trailing",
        prediction_type="v_prediction"), 10, None, None),
    (_c("DDPMScheduler", variance_type="fixed_small_log", timestep_spacing="linspace",
        prediction_type="sample", clip_sample=False, beta_schedule="sigmoid"), 10, None, None),
    (_c("DDPMScheduler", variance_type="learned_range", beta_schedule="squaredcos_cap_v2",
        steps_offset=1), 10, None, "learned_range"),
    (_c("DDPMScheduler", variance_type="learned", clip_sample_range=2.0, num_train_timesteps=100,
        trained_betas=np.linspace(1e-3, 0.1, 100).tolist()), 10, None, "learned"),
    (_c("DDPMScheduler", thresholding=True, sample_max_value=1.5, **SD), 10, None, None),
    (_c("DDPMScheduler", **ZSNR), 10, None, None),
    # DDIM
    (_c("DDIMScheduler"), 10, None, None),
    (_c("DDIMScheduler"), 10, {"eta": 1.0}, None),
    (_c("DDIMScheduler", clip_sample=False, timestep_spacing="linspace", prediction_type="sample"),
     10, {"eta": 0.5, "use_clipped_model_output": True}, None),
    (_c("DDIMScheduler", set_alpha_to_one=False, clip_sample=False, **ZSNR), 10, None, None),
    (_c("DDIMScheduler", thresholding=True, beta_schedule="squaredcos_cap_v2", steps_offset=1),
     10, None, None),
    # epsilon at zero terminal SNR: x0 = +-inf, clipped to the range by both
    (_c("DDIMScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10, None, None),
    # PNDM
    (_c("PNDMScheduler"), 10, None, None),
    (_c("PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False, **SD), 10, None, None),
    (_c("PNDMScheduler", timestep_spacing="linspace", prediction_type="v_prediction"), 10, None, None),
    (_c("PNDMScheduler", skip_prk_steps=True, timestep_spacing="trailing"), 10, None, None),
    # LMS
    (_c("LMSDiscreteScheduler"), 10, None, None),
    (_c("LMSDiscreteScheduler", use_karras_sigmas=True), 10, None, None),
    (_c("LMSDiscreteScheduler", prediction_type="v_prediction", **SD), 10, None, None),
    (_c("LMSDiscreteScheduler", use_exponential_sigmas=True, prediction_type="sample",
        timestep_spacing="trailing"), 10, None, None),
    # Euler
    (_c("EulerDiscreteScheduler"), 10, None, None),
    (_c("EulerDiscreteScheduler", use_karras_sigmas=True, prediction_type="v_prediction",
        sigma_min=0.1, sigma_max=20.0), 10, None, None),
    (_c("EulerDiscreteScheduler", **SD), 10, None, None),
    (_c("EulerDiscreteScheduler", timestep_type="continuous", **ZSNR), 10, None, None),
    (_c("EulerDiscreteScheduler", final_sigmas_type="sigma_min", use_exponential_sigmas=True),
     10, None, None),
    (_c("EulerDiscreteScheduler", use_beta_sigmas=True, timestep_spacing="trailing"), 10, None, None),
    (_c("EulerDiscreteScheduler", interpolation_type="log_linear"), 10, None, None),
    (_c("EulerDiscreteScheduler"), 10, {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 50.0}, None),
    # Euler ancestral
    (_c("EulerAncestralDiscreteScheduler"), 10, None, None),
    (_c("EulerAncestralDiscreteScheduler", **ZSNR), 10, None, None),
    (_c("EulerAncestralDiscreteScheduler", **SD), 10, None, None),
    # Heun
    (_c("HeunDiscreteScheduler"), 10, None, None),
    (_c("HeunDiscreteScheduler", use_karras_sigmas=True, prediction_type="v_prediction"), 10, None, None),
    (_c("HeunDiscreteScheduler", clip_sample=True, prediction_type="sample", beta_schedule="exp"),
     10, None, None),
    (_c("HeunDiscreteScheduler", **{**SD, "timestep_spacing": "trailing"}), 10, None, None),
    # DPM-Solver multistep (16 steps: no lower-order final steps, which diffusers uses below 15)
    (_c("DPMSolverMultistepScheduler"), 10, None, None),
    (_c("DPMSolverMultistepScheduler", solver_order=3), 16, None, None),
    (_c("DPMSolverMultistepScheduler", solver_order=1), 10, None, None),
    (_c("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"), 10, None, None),
    (_c("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=3,
        solver_type="heun"), 16, None, None),
    (_c("DPMSolverMultistepScheduler", use_karras_sigmas=True, final_sigmas_type="sigma_min"),
     10, None, None),
    (_c("DPMSolverMultistepScheduler", algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
     10, None, None),
    (_c("DPMSolverMultistepScheduler", algorithm_type="dpmsolver", solver_type="heun", solver_order=3,
        final_sigmas_type="sigma_min"), 16, None, None),
    (_c("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver", solver_type="heun",
        prediction_type="v_prediction", final_sigmas_type="sigma_min"), 10, None, None),
    (_c("DPMSolverMultistepScheduler", solver_type="heun", thresholding=True, prediction_type="sample",
        sample_max_value=1.2), 10, None, None),
    (_c("DPMSolverMultistepScheduler", **ZSNR), 10, None, None),
    (_c("DPMSolverMultistepScheduler", lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range"), 10, None, "learned_range"),
    (_c("DPMSolverMultistepScheduler", euler_at_final=True, lower_order_final=False), 16, None, None),
    (_c("DPMSolverMultistepScheduler", use_exponential_sigmas=True, **SD), 10, None, None),
    (_c("DPMSolverMultistepScheduler", use_lu_lambdas=True, solver_order=3), 10, None, None),
    (_c("DPMSolverMultistepScheduler", use_beta_sigmas=True, solver_order=3), 10, None, None),
    # UniPC
    (_c("UniPCMultistepScheduler"), 10, None, None),
    (_c("UniPCMultistepScheduler", solver_order=3), 10, None, None),
    (_c("UniPCMultistepScheduler", predict_x0=False, final_sigmas_type="sigma_min"), 10, None, None),
    (_c("UniPCMultistepScheduler", solver_type="bh1", final_sigmas_type="sigma_min",
        use_karras_sigmas=True), 10, None, None),
    (_c("UniPCMultistepScheduler", disable_corrector=[0, 2], thresholding=True, prediction_type="sample",
        timestep_spacing="trailing"), 10, None, None),
    (_c("UniPCMultistepScheduler", lower_order_final=False, final_sigmas_type="sigma_min",
        solver_order=3, prediction_type="v_prediction"), 10, None, None),
    (_c("UniPCMultistepScheduler", solver_order=1, use_exponential_sigmas=True, sigma_min=0.05,
        final_sigmas_type="sigma_min", **SD), 10, None, None),
    (_c("UniPCMultistepScheduler", solver_order=4, **ZSNR), 10, None, None),
]


def _case_id(case):
    cfg, n, kw, _ = case
    fields = ",".join(f"{k}={v}" for k, v in cfg.items()
                      if k not in ("_class_name", "trained_betas"))
    return f"{cfg['_class_name'].replace('Scheduler', '')}[{fields}]n{n}" + (f"{kw}" if kw else "")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_loop_matches_diffusers(case):
    cfg, n, kw, head = case
    init, phase, noises = inputs(len(_case_id(case)), 2 * n + 10)
    ref_ts, ref_sigma, ref = run_diffusers(cfg, n, init, phase, noises, kw, head)
    ts, sigma, ours = run_jaxgen_eager(cfg, n, init, phase, noises, kw, head)
    assert_same_ladder(ts, ref_ts)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-6)
    assert np.all(np.isfinite(ref)), "the reference itself is not finite: move the case elsewhere"
    errs = rel_errors(ours, ref)
    assert max(errs) <= TOL, f"step errors {['%.1e' % e for e in errs]}"


# compiled lax.scan loops, with the noise the loop draws itself (an rbg key: cheaper to compile
# than threefry). Every class is also traced through the scan in test_schedulers.py, and
# bench/bench_schedulers.py runs the compiled loop of every class against diffusers.
SCAN_CASES = [
    (_c("DDPMScheduler", **SD), 10, None),
    (_c("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=3), 10, None),
    (_c("UniPCMultistepScheduler", solver_order=3, use_karras_sigmas=True), 10, None),
]


@pytest.mark.parametrize("case", SCAN_CASES, ids=[_case_id(c + (None,)) for c in SCAN_CASES])
def test_compiled_scan_matches_diffusers(case):
    cfg, n, kw = case
    init, phase, _ = inputs(3, 0)
    s = scheduler_from_config(cfg)
    state = s.set_timesteps(n)
    key = jax.random.key(7, impl="rbg")
    jphase = jnp.asarray(phase)

    def model_fn(x_in, t, cond):
        return _stand_in(jnp, x_in, t, jphase, None)

    run = jax.jit(lambda st, x: sample_loop(s, st, model_fn, x, key=key, return_trajectory=True,
                                            step_kwargs=kw))
    final, traj = run(state, jnp.asarray(init))
    steps = len(state.timesteps)
    # the noise the loop drew at each step, handed to diffusers
    from jaxgen.diffusion.sampling import step_noise
    noises = np.stack([np.asarray(step_noise(key, jnp.int32(i), jnp.zeros(SHAPE))) for i in range(steps)])
    ref_ts, _, ref = run_diffusers(cfg, n, init, phase, noises, kw)
    assert_same_ladder(np.asarray(state.timesteps), ref_ts)
    assert traj.shape == (steps,) + SHAPE
    np.testing.assert_array_equal(np.asarray(final), np.asarray(traj[-1]))
    errs = rel_errors(np.asarray(traj), ref)
    assert max(errs) <= TOL, f"step errors {['%.1e' % e for e in errs]}"
