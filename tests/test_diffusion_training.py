"""The diffusion task: loss under jit per prediction type, label dropout, sampling through any
scheduler, classifier-free guidance's single pass at scale 1, and evaluate() on a tiny run.

Sampling tests share one task and N = 10 samples, and the sessions's persistent compilation
cache (conftest) serves a fresh task's identical programs, so only a handful of samplers compile.
(The jitted train step of the tiny config is trained in tests/test_training.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.digits_ddpm import get_config
from jaxgen.diffusion import process
from jaxgen.diffusion.schedulers import DDIMScheduler
from jaxgen.errors import ConfigError, DataError
from jaxgen.training.run import Run
from jaxgen.training.tasks import make_task

N = 10  # samples per call: one per class
LABELS = np.arange(N) % 10


def _task(arg="tiny"):
    return make_task(get_config(arg))


def _params(task, seed=0):
    """Random parameters of the right shapes, without compiling Flax's initialisers (that
    compilation alone costs ~20 s of CPU here; the trainer's init is covered by test_training)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(task.init_params, jax.random.key(0), task.example_batch())
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)


def _batch(n=16):
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, (n,), dtype=np.int32)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """A Run around freshly initialised tiny parameters (sampling needs no training)."""
    task = _task()
    params = _params(task)
    return Run(config=task.config, task=task, params=params, step=0,
               workdir=str(tmp_path_factory.mktemp("tiny_ddpm")))


@pytest.mark.parametrize("arg", ["tiny,epsilon,min_snr", "tiny,v_prediction,uniform",
                                 "tiny,sample,min_snr,linear"])
def test_loss_under_jit_per_prediction_type(arg):
    task = _task(arg)
    params = _params(task)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    loss, metrics = jax.jit(task.loss_fn)(params, batch, jax.random.key(1))
    assert loss.shape == () and np.isfinite(float(loss)) and float(loss) > 0
    assert np.isfinite(float(metrics["mse"]))

    # property: a model that outputs the exact target has zero loss (q_sample, targets and the
    # weighting agree); the oracle recovers eps from x_t and the known x0
    x0 = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1.0
    s, pt = task.schedule, task.prediction_type

    def oracle(params, xt, t, labels, dropout_key=None):
        return process.training_target(s, pt, x0, process.eps_from_x0(s, xt, t, x0), t)

    task.model_output = oracle
    zero, _ = jax.jit(task.loss_fn)(params, batch, jax.random.key(1))
    assert float(zero) < 1e-6


def test_label_dropout_rate():
    task = _task()
    labels = jnp.asarray(np.arange(200_000) % 10, jnp.int32)
    out = np.asarray(jax.jit(task.drop_labels)(jax.random.key(3), labels))
    assert task.null_label == 10
    dropped = out == 10
    assert abs(dropped.mean() - task.config.diffusion.label_dropout) < 0.003
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    task.config.diffusion.label_dropout = 0.0
    np.testing.assert_array_equal(task.drop_labels(jax.random.key(3), labels), labels)


def test_config_errors():
    c = get_config("tiny")
    c.model.num_class_embeds = 10
    with pytest.raises(ConfigError, match="num_class_embeds=11"):
        make_task(c)
    c = get_config("tiny")
    c.diffusion.loss_weighting = "snr"
    with pytest.raises(ConfigError, match="loss_weighting"):
        make_task(c)


def test_sample_any_scheduler_and_labels(tiny_run):
    run = tiny_run
    for name in ("DDPMScheduler", "DPMSolverMultistepScheduler"):
        x = run.sample(N, seed=1, labels=LABELS, scheduler=name)
        assert x.shape == (N, 8, 8, 1) and x.dtype == np.uint8
    x = run.sample(N, labels=7)   # the config's defaults (DDIM, its steps and guidance)
    assert x.shape == (N, 8, 8, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, run.sample(N, labels=7))     # a pure function of the seed
    assert not np.array_equal(x, run.sample(N, labels=7, seed=1))
    # a jaxgen scheduler object works when it matches the training schedule, else a clear error
    ok = run.task.make_scheduler("DDIMScheduler")
    np.testing.assert_array_equal(run.sample(N, labels=7, scheduler=ok), x)
    with pytest.raises(ConfigError, match="beta_schedule"):
        run.sample(2, scheduler=DDIMScheduler())
    with pytest.raises(ConfigError, match="is unknown"):
        run.sample(2, scheduler="NoSuchScheduler")
    with pytest.raises(DataError, match="class ids"):
        run.sample(2, labels=[3, 10])
    with pytest.raises(DataError, match="not prompts"):
        run.sample(2, prompts=["a seven", "a one"])


def test_guidance_one_skips_the_unconditional_pass(tiny_run):
    task = make_task(tiny_run.config)        # a fresh task: its samplers are traced anew
    batch_sizes = []
    real = task.model_output

    def recording(params, x, t, labels, dropout_key=None):
        batch_sizes.append(x.shape[0])       # runs while the sampler is traced
        return real(params, x, t, labels, dropout_key)

    task.model_output = recording
    a = task.sample(tiny_run.params, N, labels=LABELS, guidance_scale=1.0)
    assert batch_sizes and set(batch_sizes) == {N}
    batch_sizes.clear()
    b = task.sample(tiny_run.params, N, labels=LABELS, guidance_scale=3.0)
    assert set(batch_sizes) == {2 * N}       # unconditional and conditional as one batch
    # other scales reuse the compiled guided sampler (the scale is traced)
    batch_sizes.clear()
    compiled = len(task._samplers)
    c = task.sample(tiny_run.params, N, labels=LABELS, guidance_scale=1.5)
    assert not batch_sizes and len(task._samplers) == compiled
    assert a.shape == b.shape == c.shape == (N, 8, 8, 1)


def test_evaluate_keys(tiny_run, tmp_path):
    out = tiny_run.task.evaluate(tiny_run, str(tmp_path), num_samples=N)
    for k in ("classifier_test_accuracy", "real_fd_train_vs_test", "sample_accuracy", "sample_fd_vs_test",
              "sample_fd_vs_train", "sample_fd_ratio_to_real", "target_accuracy_0.95_met",
              "target_fd_2x_real_met"):
        assert k in out, k
    assert out["num_samples"] == N and 0 <= out["sample_accuracy"] <= 1
    assert set(out["by_scheduler"]) == {"DDPMScheduler_2", "DDIMScheduler_2", "DPMSolverMultistepScheduler_2"}
    assert set(out["by_guidance"]) == {"1", "1.5", "3"}
    assert {"accuracy", "fd_vs_test", "fd_ratio_to_real"} <= set(out["by_guidance"]["3"])
    # the default sampling (tiny: DDIM, 2 steps) is measured once and reused
    assert out["by_scheduler"]["DDIMScheduler_2"]["fd_vs_test"] == out["sample_fd_vs_test"]
    for png in ("samples_per_class.png", "trajectory.png", "samples_guidance_3.png"):
        assert (tmp_path / png).stat().st_size > 0
