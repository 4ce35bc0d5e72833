"""Beta schedules, sigma ladders and the forward-process helpers against diffusers and closed forms."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.diffusion import process as P
from jaxgen.diffusion import schedules as sch

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


# -- schedules --------------------------------------------------------------------------------
def test_linspace_f32_is_torch_linspace():
    r = np.random.RandomState(0)
    cases = [(1e-4, 0.02, 1000), (0.00085**0.5, 0.012**0.5, 1000), (-6, 6, 1000), (0.1, 0.2, 2),
             (0, 1, 1)] + [(r.uniform(-1, 1), r.uniform(-1, 1), int(r.randint(1, 2000))) for _ in range(40)]
    for a, b, n in cases:
        ref = torch.linspace(a, b, n, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(sch.linspace_f32(a, b, n), ref)


@pytest.mark.parametrize("kw", [
    {}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"}, {"beta_schedule": "laplace"},
    {"beta_schedule": "linear", "num_train_timesteps": 37, "beta_start": 1e-3, "beta_end": 0.05},
])
def test_betas_and_alpha_bar_are_diffusers_bit_for_bit(kw):
    ref = diffusers.DDPMScheduler(**kw)
    betas = sch.make_betas(kw.get("beta_schedule", "linear"), kw.get("num_train_timesteps", 1000),
                           kw.get("beta_start", 1e-4), kw.get("beta_end", 0.02))
    np.testing.assert_array_equal(betas, ref.betas.numpy())
    np.testing.assert_array_equal(sch.make_alphas_cumprod(betas), ref.alphas_cumprod.numpy())
    s = sch.make_schedule(**kw)
    np.testing.assert_array_equal(np.asarray(s.alpha_bar), ref.alphas_cumprod.numpy())
    assert s.num_train_timesteps == betas.shape[0]


def test_sigmoid_and_trained_betas():
    ref = diffusers.DDPMScheduler(beta_schedule="sigmoid")
    # torch's float32 sigmoid is not correctly rounded; jaxgen's is: an ulp apart
    np.testing.assert_allclose(sch.make_betas("sigmoid"), ref.betas.numpy(), rtol=1e-6)
    tb = np.linspace(1e-3, 0.1, 50)
    np.testing.assert_array_equal(sch.make_betas(trained_betas=tb, num_train_timesteps=50),
                                  tb.astype(np.float32))
    with pytest.raises(Exception, match="trained_betas has shape"):
        sch.make_betas(trained_betas=tb, num_train_timesteps=40)
    with pytest.raises(Exception, match="beta_schedule='cosine'"):
        sch.make_betas("cosine")


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_zero_terminal_snr(kind):
    kw = {"beta_schedule": kind, "rescale_betas_zero_snr": True}
    if kind == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    ref = diffusers.DDPMScheduler(**kw)
    s = sch.make_schedule(**kw)
    ab = np.asarray(s.alpha_bar)
    assert ab[-1] == 0.0 and np.asarray(s.betas)[-1] == 1.0
    plain = sch.make_schedule(**{k: v for k, v in kw.items() if k != "rescale_betas_zero_snr"})
    np.testing.assert_allclose(ab[0], np.asarray(plain.alpha_bar)[0], rtol=1e-6)
    # torch's float32 sqrt is off by an ulp on some inputs; the rescale subtracts nearly equal
    # numbers near T, so compare absolutely
    np.testing.assert_allclose(ab, ref.alphas_cumprod.numpy(), rtol=0, atol=2e-6)


def test_sigma_helpers():
    ac = sch.make_alphas_cumprod(sch.make_betas())
    train = sch.sigmas_from_alphas_cumprod(ac)
    log_s = np.log(train)
    t = sch.sigma_to_t(train[[0, 10, 500, 999]].astype(np.float64), log_s)
    np.testing.assert_allclose(t, [0, 10, 500, 999], atol=1e-9)
    k = sch.karras_sigmas(0.03, 14.6, 10)
    assert np.isclose(k[0], 14.6) and np.isclose(k[-1], 0.03) and np.all(np.diff(k) < 0)
    e = sch.exponential_sigmas(0.03, 14.6, 10)
    np.testing.assert_allclose(np.diff(np.log(e)), np.diff(np.log(e))[0])
    b = sch.beta_sigmas(0.03, 14.6, 10)
    assert np.isclose(b[0], 14.6) and np.isclose(b[-1], 0.03) and np.all(np.diff(b) < 0)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_spacings_are_diffusers(spacing):
    for n, offset in [(10, 0), (7, 1), (50, 1)]:
        ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        ddim.set_timesteps(n)
        np.testing.assert_array_equal(sch.spaced_timesteps(spacing, 1000, n, offset), ddim.timesteps.numpy())
        euler = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=offset)
        euler.set_timesteps(n)
        np.testing.assert_array_equal(sch.spaced_timesteps_float(spacing, 1000, n, offset),
                                      euler.timesteps.numpy())
        dpm = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=offset)
        dpm.set_timesteps(n)
        np.testing.assert_array_equal(sch.spaced_timesteps_multistep(spacing, 1000, n, offset),
                                      dpm.timesteps.numpy())


# -- forward process --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    r = np.random.RandomState(0)
    x0 = jnp.asarray(r.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32))
    eps = jnp.asarray(r.randn(4, 8, 8, 3).astype(np.float32))
    t = jnp.asarray([0, 17, 500, 999], jnp.int32)
    return x0, eps, t


def test_q_sample_is_diffusers_add_noise_and_velocity(data):
    x0, eps, t = data
    s = sch.make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    tt = lambda a: torch.from_numpy(np.moveaxis(np.asarray(a), -1, 1).copy())  # noqa: E731
    back = lambda a: np.moveaxis(a.numpy(), 1, -1)  # noqa: E731
    ref_xt = back(ref.add_noise(tt(x0), tt(eps), torch.from_numpy(np.asarray(t)).long()))
    np.testing.assert_allclose(np.asarray(P.q_sample(s, x0, t, eps)), ref_xt, rtol=1e-6, atol=1e-6)
    ref_v = back(ref.get_velocity(tt(x0), tt(eps), torch.from_numpy(np.asarray(t)).long()))
    np.testing.assert_allclose(np.asarray(P.training_target(s, "v_prediction", x0, eps, t)), ref_v,
                               rtol=1e-6, atol=1e-6)


def test_forward_process_closed_form():
    """Composing x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) n_t from x0 gives mean
    sqrt(alpha_bar_t) x0 and variance 1 - alpha_bar_t: the recursion in float64 against the table,
    and a Monte Carlo check of q_sample."""
    s = sch.make_schedule("squaredcos_cap_v2")
    betas = np.asarray(s.betas, np.float64)
    m, v = 1.0, 0.0
    means, variances = [], []
    for b in betas:
        m, v = np.sqrt(1 - b) * m, (1 - b) * v + b
        means.append(m)
        variances.append(v)
    ab = np.asarray(s.alpha_bar, np.float64)
    np.testing.assert_allclose(np.square(means), ab, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(variances, 1 - ab, rtol=2e-5, atol=1e-7)
    x0 = jnp.full((20000,), 0.7)
    t = jnp.full((20000,), 300, jnp.int32)
    xt = P.q_sample(s, x0, t, jnp.asarray(np.random.RandomState(0).randn(20000).astype(np.float32)))
    a = float(s.alpha_bar[300])
    assert abs(float(jnp.mean(xt)) - np.sqrt(a) * 0.7) < 0.02
    assert abs(float(jnp.var(xt)) - (1 - a)) < 0.02


def test_posterior_is_ddpm_step(data):
    """DDPM's step with an x0-predicting model and zero noise is the posterior mean; its variance
    is diffusers' fixed_small variance."""
    x0, eps, _ = data
    s = sch.make_schedule()
    ref = diffusers.DDPMScheduler(prediction_type="sample", clip_sample=False)
    ref.set_timesteps(1000)       # consecutive timesteps: prev_t = t - 1
    for t in [1, 250, 999]:
        xt = P.q_sample(s, x0, jnp.full((4,), t), eps)
        tt = lambda a: torch.from_numpy(np.moveaxis(np.asarray(a), -1, 1).copy())  # noqa: E731
        import diffusers.schedulers.scheduling_ddpm as mod
        original = mod.randn_tensor
        mod.randn_tensor = lambda shape, **kw: torch.zeros(shape)
        try:
            out = ref.step(tt(x0), t, tt(xt)).prev_sample
        finally:
            mod.randn_tensor = original
        mean, var, log_var = P.posterior_mean_variance(s, x0, xt, jnp.full((4,), t))
        ref_mean = np.moveaxis(out.numpy(), 1, -1)
        # float64 truth from the same table
        ab = np.asarray(s.alpha_bar, np.float64)
        b = np.asarray(s.betas, np.float64)[t]
        a, ap = ab[t], ab[t - 1]
        truth = (b * np.sqrt(ap) / (1 - a) * np.asarray(x0, np.float64)
                 + (1 - ap) * np.sqrt(1 - b) / (1 - a) * np.asarray(xt, np.float64))
        err = lambda m: np.linalg.norm(m - truth) / np.linalg.norm(truth)  # noqa: E731
        # diffusers forms beta_t as 1 - alpha_bar_t / alpha_bar_{t-1} in float32 (cancellation at
        # small t); jaxgen reads beta_t from the table, which is why it is closer to the truth
        assert err(np.asarray(mean)) <= 1e-6
        assert err(ref_mean) <= 1e-4
        np.testing.assert_allclose(np.asarray(var)[:, 0, 0, 0], float(ref._get_variance(t)), rtol=1e-3)
        np.testing.assert_allclose(np.asarray(var)[:, 0, 0, 0], b * (1 - ap) / (1 - a), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(log_var), np.log(np.asarray(var)), rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_round_trip(data, prediction_type):
    x0, eps, t = data
    t = t[:3]   # alpha_bar < 1 and > 0 everywhere
    x0, eps = x0[:3], eps[:3]
    s = sch.make_schedule()
    xt = P.q_sample(s, x0, t, eps)
    target = P.training_target(s, prediction_type, x0, eps, t)
    px0, peps = P.predict_x0_and_eps(s, prediction_type, xt, t, target)
    np.testing.assert_allclose(np.asarray(px0), np.asarray(x0), atol=2e-4)
    np.testing.assert_allclose(np.asarray(peps), np.asarray(eps), atol=2e-4)
    v = P.v_from_x0_eps(s, x0, eps, t)
    np.testing.assert_allclose(np.asarray(P.x0_from_v(s, xt, t, v)), np.asarray(x0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(P.eps_from_v(s, xt, t, v)), np.asarray(eps), atol=1e-5)
    with pytest.raises(Exception, match="prediction_type='flow'"):
        P.training_target(s, "flow", x0, eps, t)


def test_snr_and_min_snr_weights():
    s = sch.make_schedule()
    t = jnp.arange(0, 1000, 37)
    snr = np.asarray(P.snr(s, t), np.float64)
    ab = np.asarray(s.alpha_bar, np.float64)[np.asarray(t)]
    np.testing.assert_allclose(snr, ab / (1 - ab), rtol=1e-5)
    g = 5.0
    clipped = np.minimum(snr, g)
    np.testing.assert_allclose(np.asarray(P.min_snr_weights(s, t, g, "epsilon")), clipped / snr, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(P.min_snr_weights(s, t, g, "v_prediction")),
                               clipped / (snr + 1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(P.min_snr_weights(s, t, g, "sample")), clipped, rtol=1e-5)
    z = sch.make_schedule(rescale_betas_zero_snr=True)
    w = P.min_snr_weights(z, jnp.asarray([999]), g, "epsilon")
    assert float(w[0]) == 1.0          # the SNR -> 0 limit, not 0 / 0
    assert float(P.min_snr_weights(z, jnp.asarray([999]), g, "v_prediction")[0]) == 0.0
