"""The two-stage VQ-VAE + prior run (configs/digits_vqvae.py at ':tiny'): checkpoints of both
stages, load_run, the Run's abilities, resuming after the first stage, evaluation; the EMA
codebook in the train state's model state (updates, checkpoints, exact resume, dead-code restarts)
and the gradient codebook."""
import json
import os

import jax
import numpy as np
import pytest

import jaxgen
from configs.digits_vqvae import get_config
from jaxgen.data.pipeline import images_to_float
from jaxgen.errors import ConfigError, DataError
from jaxgen.training.tasks import make_task
from jaxgen.training.stages import stage_config
from jaxgen.training.trainer import Trainer, train


def _steps(workdir, stage):
    folder = os.path.join(workdir, "checkpoints", stage)
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _rows(workdir, stage):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("stage") == stage]


def _assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    return train(get_config("tiny"), str(tmp_path_factory.mktemp("vqvae") / "run"))


@pytest.fixture(scope="module")
def images(tiny_run):
    return tiny_run.task.load_data("test").images[:12]


def test_both_stages_in_one_run_directory(tiny_run):
    wd = tiny_run.workdir
    assert _steps(wd, "vqvae") == [2] and _steps(wd, "prior") == [2]
    assert [r["step"] for r in _rows(wd, "vqvae")] == [1, 2]
    assert [r["step"] for r in _rows(wd, "prior")] == [1, 2]
    run = jaxgen.load_run(wd)
    assert set(run.params) == {"vqvae", "prior"} and run.step == 2
    _assert_trees_equal(run.params, tiny_run.params)
    _assert_trees_equal(run.variables, tiny_run.variables)  # the EMA codebook's state too, if any
    assert type(run.model).__name__ == "ConvVQVAE"


def test_encode_decode_reconstruct_sample(tiny_run, images):
    run = tiny_run
    codes = run.encode(images)
    assert codes.shape == (12, 4, 4) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < run.config.model.num_codes
    recon = run.reconstruct(images)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    np.testing.assert_array_equal(run.decode(codes), recon)  # reconstruct = decode(encode)
    samples = run.sample(6, labels=[0, 1, 2, 7, 8, 9])
    assert samples.shape == (6, 8, 8, 1) and samples.dtype == np.uint8
    np.testing.assert_array_equal(run.sample(6, labels=[0, 1, 2, 7, 8, 9]), samples)  # seeded
    assert run.sample(6, labels=7).shape == (6, 8, 8, 1)
    assert run.sample(6, seed=1).shape == (6, 8, 8, 1)  # labels default to 0, 1, ..., 5
    # one compiled sampler per sample count; temperature is an argument (0: argmax decoding)
    greedy = run.task.sample_codes(run.variables, 6, seed=0, labels=3, temperature=0.0)
    np.testing.assert_array_equal(run.task.sample_codes(run.variables, 6, seed=5, labels=3, temperature=0.0), greedy)
    assert list(run.task._samplers) == [6]


def test_run_errors_name_the_fix(tiny_run, images):
    run = tiny_run
    with pytest.raises(DataError, match=r"\[0, 9\]"):
        run.sample(2, labels=[0, 10])
    with pytest.raises(DataError, match="labels="):
        run.sample(2, prompts=["a seven"])
    with pytest.raises(DataError, match=r"int \[N, 4, 4\]"):
        run.decode(np.zeros((2, 16), np.int32))
    with pytest.raises(DataError, match=r"\[0, 63\]"):
        run.decode(np.full((1, 4, 4), 64))
    with pytest.raises(DataError, match="uint8"):
        run.reconstruct(images.astype(np.float32))
    bad = get_config("tiny")
    bad.stages.prior.model.seq_len = 4
    with pytest.raises(ConfigError, match="seq_len=16"):
        make_task(bad)


def test_prior_trains_on_the_frozen_final_vqvae_codes(tiny_run):
    run = tiny_run
    task = run.task
    prior_task = task.stage_task("prior", {"vqvae": run.variables["vqvae"]}, stage_config(run.config, "prior"))
    ds = task.load_data("train")
    arrays = prior_task.batch_arrays(ds)
    assert arrays["codes"].shape == (len(ds), 16) and arrays["codes"].dtype == np.int32
    np.testing.assert_array_equal(arrays["codes"], run.encode(ds.images).reshape(len(ds), 16))
    np.testing.assert_array_equal(arrays["label"], ds.labels)
    preview = prior_task.preview(run.params["prior"], None)  # 2 samples per class, decoded
    assert preview.dtype == np.uint8 and preview.ndim == 3 and preview.shape[-1] == 1
    vq_task = task.stage_task("vqvae", {}, stage_config(run.config, "vqvae"))
    assert vq_task.preview(run.variables["vqvae"], {"image": ds.images[:4]}).dtype == np.uint8


def test_resume_after_the_first_stage_trains_only_the_second(tmp_path, data_dir):
    config, wd = get_config("tiny"), str(tmp_path / "run")
    task = make_task(config)
    sconf = stage_config(config, "vqvae")
    trainer = Trainer(sconf, wd, "vqvae", task.stage_task("vqvae", {}, sconf), run_config=config)
    vq_state = trainer.fit()  # as if the run had stopped after stage one
    trainer.checkpointer.close()
    vq_params = jax.tree_util.tree_map(np.asarray, vq_state.params)
    vq_model_state = jax.tree_util.tree_map(np.asarray, vq_state.model_state)
    assert not os.path.exists(os.path.join(wd, "checkpoints", "prior"))
    with pytest.raises(Exception, match="prior"):
        jaxgen.load_run(wd)  # the prior has no checkpoint yet
    run = train(config, wd)  # the same command again
    _assert_trees_equal(run.params["vqvae"], vq_params)
    _assert_trees_equal(run.model_state["vqvae"], vq_model_state)  # the default's EMA codebook
    assert _steps(wd, "vqvae") == [2] and len(_rows(wd, "vqvae")) == 2  # stage one not retrained
    assert _steps(wd, "prior") == [2] and len(_rows(wd, "prior")) == 2
    assert run.sample(6, labels=4).shape == (6, 8, 8, 1)


def test_evaluate_writes_metrics_and_grids(tiny_run, tmp_path):
    out = tiny_run.task.evaluate(tiny_run, str(tmp_path), num_samples=6)
    for key in ("test_mse", "codebook_usage_train", "codebook_perplexity_train", "codebook_usage_test",
                "prior_bits_per_code_test", "sample_accuracy", "classifier_test_accuracy"):
        assert np.isfinite(out[key]), key
    assert 0 <= out["codebook_usage_train"] <= 1 and 1 <= out["codebook_perplexity_train"] <= 64
    assert set(out["by_temperature"]) == {"0.7", "1"}
    assert os.path.isfile(tmp_path / "samples_per_class.png")
    assert os.path.isfile(tmp_path / "reconstructions.png")


# -- the two codebooks ----------------------------------------------------------------------
def _ema_config(threshold=3, steps=2):
    """':tiny' with the EMA codebook, restarts after ``threshold`` unused updates, the pull off."""
    c = get_config("tiny")
    c.model.codebook_type, c.model.dead_code_threshold, c.vq.dead_code_weight = "ema", threshold, 0.0
    c.stages.vqvae.total_steps = steps
    return c


def _gradient_config():
    """':tiny' with the gradient codebook and the pull on unused codes."""
    c = get_config("tiny")
    c.model.codebook_type, c.model.dead_code_threshold, c.vq.dead_code_weight = "gradient", 0, 0.1
    return c


def _vqvae_trainer(config, workdir):
    task = make_task(config)
    sconf = stage_config(config, "vqvae")
    return Trainer(sconf, workdir, "vqvae", task.stage_task("vqvae", {}, sconf), run_config=config)


def test_ema_codebook_state_is_trained_checkpointed_and_resumed_exactly(tmp_path, data_dir):
    config = _ema_config(steps=3)
    config.checkpoint_every = 1
    straight = _vqvae_trainer(config, str(tmp_path / "straight"))
    init = jax.tree_util.tree_map(np.asarray, straight._create().model_state)
    full = straight.fit()
    straight.checkpointer.close()
    ema = full.model_state["vq_ema"]["quantizer"]
    assert set(ema) == {"embedding", "cluster_size", "embed_sum", "unused"}
    assert "quantizer" not in full.params or "embedding" not in full.params["quantizer"]  # not a parameter
    start = init["vq_ema"]["quantizer"]
    assert not np.allclose(ema["embedding"], start["embedding"])  # three EMA updates moved it
    assert not np.allclose(ema["cluster_size"], start["cluster_size"])
    # interrupted after one step, then the same command again
    wd = str(tmp_path / "resumed")
    first = _vqvae_trainer(config, wd)
    first.fit(stop_after=1)
    first.checkpointer.close()
    second = _vqvae_trainer(config, wd)
    restored, step = second.initial_state()
    assert step == 1 and restored.model_state is not None
    resumed = second.fit()
    second.checkpointer.close()
    _assert_trees_equal(resumed.params, full.params)
    _assert_trees_equal(resumed.model_state, full.model_state)
    _assert_trees_equal(resumed.opt_state, full.opt_state)
    # the checkpoint holds what training ended with
    latest = _vqvae_trainer(config, wd)
    back, _, _ = latest.checkpointer.restore(latest.abstract_state())
    latest.checkpointer.close()
    _assert_trees_equal(back.model_state, full.model_state)


def test_dead_codes_restart_at_encoder_outputs_of_the_batch(data_dir):
    """Codes 32..63 sit far from every encoder output, so nothing picks them; those unused for
    threshold - 1 updates already (32..47) are restarted by the next train step at rows of the
    batch's encoder outputs; the others (48..63) only count one more unused update."""
    import optax

    from jaxgen.training.state import create_state
    from jaxgen.training.step import make_train_step

    threshold = 3
    config = stage_config(_ema_config(threshold), "vqvae")
    task = make_task(_ema_config(threshold)).stage_task("vqvae", {}, config)
    params, state = task.init_variables(jax.random.key(0), task.example_batch())
    q = dict(state["vq_ema"]["quantizer"])
    far = 100.0 + np.arange(32 * 8, dtype=np.float32).reshape(32, 8)
    q["embedding"] = q["embedding"].at[32:].set(far)
    q["embed_sum"] = q["embed_sum"].at[32:].set(far)
    q["unused"] = q["unused"].at[32:48].set(threshold - 1)
    state = {"vq_ema": {"quantizer": q}}
    images = task.load_data("train").images[:16]
    x = images_to_float(images)  # what the loss feeds the encoder
    z = np.asarray(task.model.apply({"params": params, **state}, x, method=lambda m, v: m.encode(v))).reshape(-1, 8)
    tx = optax.sgd(1e-3)
    step = jax.jit(make_train_step(task.loss_fn_with_state, tx, stateful=True))
    new, metrics = step(create_state(params, tx, False, state), {"image": images}, jax.random.key(1))
    ema = jax.tree_util.tree_map(np.asarray, new.model_state["vq_ema"]["quantizer"])
    # every restarted code is one of the batch's encoder outputs (under the pre-step parameters)
    dist = ((ema["embedding"][32:48, None, :] - z[None]) ** 2).sum(-1).min(-1)  # [16]
    np.testing.assert_allclose(dist, 0.0, atol=1e-10)
    assert len({tuple(r) for r in ema["embedding"][32:48]}) > 1  # drawn at random, not one point
    np.testing.assert_array_equal(ema["unused"][32:48], 0)
    np.testing.assert_array_equal(ema["cluster_size"][32:48], 1.0)
    np.testing.assert_array_equal(ema["embed_sum"][32:48], ema["embedding"][32:48])
    assert (ema["embedding"][48:] > 50).all()  # not yet dead: still far, one more unused update
    np.testing.assert_array_equal(ema["unused"][48:], 1)
    assert float(metrics["codes_restarted"]) == 16 and int(new.nonfinite) == 0


def test_gradient_codebook_trains_without_model_state(tmp_path, data_dir):
    trainer = _vqvae_trainer(_gradient_config(), str(tmp_path / "run"))
    state = trainer.fit()
    trainer.checkpointer.close()
    assert state.model_state is None and int(state.step) == 2
    assert state.params["quantizer"]["embedding"]["embedding"].shape == (64, 8)
    rows = _rows(trainer.workdir, "vqvae")
    assert all(np.isfinite(r["dead_code_loss"]) for r in rows) and "codes_restarted" not in rows[0]


def test_codebook_config_errors_name_the_fix():
    c = _ema_config()
    c.vq.dead_code_weight = 0.1
    with pytest.raises(ConfigError, match="dead_code_weight=0"):
        make_task(c).stage_task("vqvae", {}, stage_config(c, "vqvae"))
    c = _gradient_config()
    c.model.dead_code_threshold = 5
    with pytest.raises(ConfigError, match="codebook_type='ema'"):
        jax.eval_shape(make_task(c).stage_task("vqvae", {}, stage_config(c, "vqvae")).init_variables,
                       jax.random.key(0), make_task(c).example_batch())
    c = _gradient_config()
    c.model.codebook_type = "kmeans"
    with pytest.raises(ConfigError, match="gradient, ema"):
        jax.eval_shape(make_task(c).init_params, jax.random.key(0), make_task(c).example_batch())
