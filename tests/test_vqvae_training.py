"""The two-stage VQ-VAE + prior run (configs/digits_vqvae.py at ':tiny'): checkpoints of both
stages, load_run, the Run's abilities, resuming after the first stage, evaluation."""
import json
import os

import jax
import numpy as np
import pytest

import jaxgen
from configs.digits_vqvae import get_config
from jaxgen.errors import ConfigError, DataError
from jaxgen.training.tasks import make_task
from jaxgen.training.trainer import Trainer, stage_config, train


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
    greedy = run.task.sample_codes(run.params, 6, seed=0, labels=3, temperature=0.0)
    np.testing.assert_array_equal(run.task.sample_codes(run.params, 6, seed=5, labels=3, temperature=0.0), greedy)
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
    prior_task = task.stage_task("prior", {"vqvae": run.params["vqvae"]}, stage_config(run.config, "prior"))
    ds = task.load_data("train")
    arrays = prior_task.batch_arrays(ds)
    assert arrays["codes"].shape == (len(ds), 16) and arrays["codes"].dtype == np.int32
    np.testing.assert_array_equal(arrays["codes"], run.encode(ds.images).reshape(len(ds), 16))
    np.testing.assert_array_equal(arrays["label"], ds.labels)
    preview = prior_task.preview(run.params["prior"], None)  # 2 samples per class, decoded
    assert preview.dtype == np.uint8 and preview.ndim == 3 and preview.shape[-1] == 1
    vq_task = task.stage_task("vqvae", {}, stage_config(run.config, "vqvae"))
    assert vq_task.preview(run.params["vqvae"], {"image": ds.images[:4]}).dtype == np.uint8


def test_resume_after_the_first_stage_trains_only_the_second(tmp_path, data_dir):
    config, wd = get_config("tiny"), str(tmp_path / "run")
    task = make_task(config)
    sconf = stage_config(config, "vqvae")
    trainer = Trainer(sconf, wd, "vqvae", task.stage_task("vqvae", {}, sconf), run_config=config)
    vq_state = trainer.fit()  # as if the run had stopped after stage one
    trainer.checkpointer.close()
    vq_params = jax.tree_util.tree_map(np.asarray, vq_state.params)
    assert not os.path.exists(os.path.join(wd, "checkpoints", "prior"))
    with pytest.raises(Exception, match="prior"):
        jaxgen.load_run(wd)  # the prior has no checkpoint yet
    run = train(config, wd)  # the same command again
    _assert_trees_equal(run.params["vqvae"], vq_params)
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
