"""Training engine: pipeline order, sharding rule, EMA, NaN guard, configs, CLI errors, Run."""
import glob
import json
import importlib
import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from jaxgen.data import pipeline
from jaxgen.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from jaxgen.training import mesh as mesh_lib
from jaxgen.training.optim import ema_decay, ema_update
from jaxgen.training.trainer import Trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(name, arg="tiny"):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = [pipeline.batch_indices(100, 16, 3, s) for s in range(13)]
    b = [pipeline.batch_indices(100, 16, 3, s) for s in range(13)]
    assert all((x == y).all() for x, y in zip(a, b))
    epoch0 = np.concatenate(a[:6])  # 100 // 16 = 6 steps per epoch, no repeats inside an epoch
    assert len(set(epoch0.tolist())) == 96
    assert not (a[6] == a[0]).all()  # the next epoch is reshuffled
    assert not (pipeline.batch_indices(100, 16, 4, 0) == a[0]).all()
    assert pipeline.process_slice(16, 1, 2) == slice(8, 16)
    with pytest.raises(DataError, match="larger than the dataset"):
        pipeline.batch_indices(10, 16, 0, 0)


def test_fsdp_rule_and_mesh_errors():
    assert mesh_lib.param_spec((3, 3, 32, 64), 2) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert mesh_lib.param_spec((7,), 2) == jax.sharding.PartitionSpec()
    assert mesh_lib.param_spec((33, 31, 5), 2) == jax.sharding.PartitionSpec()
    assert mesh_lib.param_spec((3, 3, 32, 64), 1) == jax.sharding.PartitionSpec()
    with pytest.raises(ConfigError, match="mesh.data"):
        mesh_lib.make_mesh(data=2, fsdp=1)  # one CPU device here
    m = mesh_lib.make_mesh()
    assert m.axis_names == ("data", "fsdp") and m.shape["data"] == len(jax.devices())


def test_ema_warmup():
    assert float(ema_decay(0, 0.999)) == pytest.approx(0.1)
    assert float(ema_decay(10_000, 0.999)) == pytest.approx(0.999)
    ema = ema_update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0, 0.999)
    np.testing.assert_allclose(ema["w"], 0.9)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    wd = str(tmp_path_factory.mktemp("tiny_ae"))
    c = get_config("digits_ae")
    c.ema.decay = 0.99
    return train(c, wd)


def test_run_api(tiny_run, data_dir):
    run = tiny_run
    assert run.step == 2 and isinstance(run.config.model.channels, (tuple, list))
    again = jaxgen.load_run(run.workdir, step=2)
    for a, b in zip(jax.tree_util.tree_leaves(run.params), jax.tree_util.tree_leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    images = run.task.load_data("test").images[:5]
    codes = run.encode(images)
    assert codes.shape == (5, 2) and codes.dtype == np.float32
    out = run.decode(codes)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert run.reconstruct(images).shape == images.shape
    with pytest.raises(DataError, match=r"uint8 \[N, 8, 8, 1\]"):
        run.reconstruct(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(DataError, match="dtype float32"):
        run.reconstruct(images.astype(np.float32))
    with pytest.raises(AttributeError, match="no sample"):
        run.sample(2)
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        jaxgen.load_run(run.workdir, step=7)
    assert os.path.isfile(os.path.join(run.workdir, "metrics.jsonl"))
    assert glob.glob(os.path.join(run.workdir, "tensorboard", "events.*"))


def test_resume_refuses_a_changed_model(tiny_run):
    c = get_config("digits_ae")
    c.ema.decay = 0.99
    c.model.hidden_dim = 7
    with pytest.raises((ConfigError, CheckpointError)):
        Trainer(c, tiny_run.workdir).fit()
    c = get_config("digits_ae")
    c.ema.decay = 0.99
    c.total_steps = 3  # schedules may change: training goes on from step 2
    train(c, tiny_run.workdir)
    assert jaxgen.load_run(tiny_run.workdir).step == 3


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_guard(policy, tmp_path, data_dir):
    c = get_config("digits_ae")
    c.optim.lr = 1e35  # the first update overflows
    c.optim.warmup_steps = 0
    c.nan_policy = policy
    wd = str(tmp_path / policy)
    if policy == "stop":
        with pytest.raises(NonFiniteError, match="nan_policy=skip"):
            train(c, wd)
        assert not [d for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()]
    else:
        run = train(c, wd)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(run.params))


def test_unwritable_workdir(tmp_path, data_dir):
    if os.geteuid() == 0:
        target = "/proc/jaxgen-cannot-write-here"  # root ignores permission bits
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        os.chmod(locked, stat.S_IRUSR | stat.S_IXUSR)
        target = str(locked / "run")
    with pytest.raises(CheckpointError, match="choose a --workdir"):
        Trainer(get_config("digits_ae"), target)


def test_config_errors(tmp_path, data_dir):
    c = get_config("digits_ae")
    c.compute_dtype = "float8"
    with pytest.raises(ConfigError, match="compute_dtype"):
        Trainer(c, str(tmp_path / "a"))
    c = get_config("digits_ae")
    c.batch_size = 12
    c.mesh.data = 1
    c.model_class = "jaxgen.nn.autoencoder:NoSuchNet"
    with pytest.raises(ConfigError, match="NoSuchNet"):
        Trainer(c, str(tmp_path / "b"))
    with pytest.raises(ValueError, match="unknown config argument"):
        get_config("digits_ae", "tiny,huge")


def test_cli_rejects_misspelled_field(tmp_path):
    out = subprocess.run([sys.executable, "-m", "train", "--config", "configs/digits_ae.py:tiny",
                          "--config.optim.lrr=0.1", f"--workdir={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0
    assert "lrr" in out.stderr
    assert not os.path.isdir(os.path.join(tmp_path, "checkpoints"))


def test_missing_dataset_is_a_clear_error_without_leftovers(tmp_path, data_dir):
    c = get_config("digits_ae")
    c.data.name = "mnist"  # not prepared here, and never downloaded
    with pytest.raises(DataError, match="mnist"):
        Trainer(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_compute_keeps_float32_params(dtype, tmp_path, data_dir):
    c = get_config("digits_ae")
    c.compute_dtype = dtype
    run = train(c, str(tmp_path / dtype))
    leaves = jax.tree_util.tree_leaves(run.params)
    assert all(x.dtype == jnp.float32 for x in leaves)
    rows = [json.loads(line) for line in open(os.path.join(run.workdir, "metrics.jsonl"))]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert all(("loss_scale" in r) == (dtype == "float16") for r in rows if "loss" in r)
    if dtype == "float16":           # the dynamic loss scale is part of the checkpoint and resumes
        state = jaxgen.load_run(run.workdir)
        from jaxgen.training.checkpoint import Checkpointer

        folder = os.path.join(run.workdir, "checkpoints")
        step = Checkpointer(folder, read_only=True).latest_step()
        with open(os.path.join(folder, str(step), "state", "_METADATA")) as f:
            keys = {k.split(",")[0].strip("(')") for k in json.load(f)["tree_metadata"]}
        assert "loss_scale" in keys and state.step == step


def test_compute_dtype_reaches_the_convolutions(tmp_path, data_dir):
    """Under task.computing_in (how the trainer traces the loss) the model's convolutions and
    matmuls take bf16 operands; the loss stays float32 and the task's own model is back after."""
    from jaxgen.training.step import cast_floating
    from jaxgen.training.tasks import make_task

    task = make_task(get_config("digits_ae"))
    task.attach(str(tmp_path / "run"), training=True)
    batch = {k: np.repeat(v, 2, 0) for k, v in task.example_batch().items()}
    params = task.init_params(jax.random.key(0), batch)

    def operand_dtypes(dtype):
        def loss(p):
            with task.computing_in(dtype):
                return task.loss_fn(cast_floating(p, dtype), batch, jax.random.key(0))[0]
        jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
        assert jax.eval_shape(loss, params).dtype == jnp.float32
        return {str(e.invars[1].aval.dtype) for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"}

    model = task.model
    assert operand_dtypes(jnp.bfloat16) == {"bfloat16"} and task.model is model
    assert operand_dtypes(jnp.float32) == {"float32"}


def test_float16_loss_scaling_keeps_small_gradients_and_backs_off_on_overflow():
    """float16 compute: the scaled loss keeps a gradient that float16 flushes to zero; a scale
    that overflows the gradient skips the step (not counted as non-finite) and halves until it fits."""
    import optax

    from jaxgen.training.state import INITIAL_LOSS_SCALE, create_state
    from jaxgen.training.step import make_train_step

    def tiny_grad(params, batch, key):      # d loss / d w = 1e-8 per element: below float16's range
        w = params["w"]                      # float16 here (compute_dtype)
        return (jnp.sum(w) * jnp.float16(1e-4)).astype(jnp.float32) * 1e-4, {}

    tx = optax.sgd(1.0)
    params = {"w": jnp.ones((4,), jnp.float32)}
    plain = jax.jit(make_train_step(tiny_grad, tx, compute_dtype=jnp.float16))
    _, m = plain(create_state(params, tx, use_ema=False), {}, jax.random.key(0))
    assert float(m["grad_norm"]) == 0.0                                      # flushed to zero
    scaled = jax.jit(make_train_step(tiny_grad, tx, compute_dtype=jnp.float16))
    state, m = scaled(create_state(params, tx, use_ema=False, loss_scale=True), {}, jax.random.key(0))
    np.testing.assert_allclose(float(m["grad_norm"]), 2e-8, rtol=2e-2)       # sqrt(4) * 1e-8
    assert float(m["loss_scale"]) == INITIAL_LOSS_SCALE and int(state.loss_scale["good_steps"]) == 1

    def big_grad(params, batch, key):       # d loss / d w = 1000: times 2^15 overflows float16
        return (jnp.sum(params["w"] * jnp.float16(1000.0))).astype(jnp.float32), {}

    step = jax.jit(make_train_step(big_grad, tx, compute_dtype=jnp.float16))
    state = create_state(params, tx, use_ema=False, loss_scale=True)
    scales = []
    for _ in range(10):
        state, m = step(state, {}, jax.random.key(0))
        scales.append(float(m["loss_scale"]))
    assert scales == [2.0 ** k for k in range(15, 5, -1)]                   # halved until 1000 x 64 < 65504
    assert int(state.nonfinite) == 0 and int(state.step) == 10
    np.testing.assert_allclose(state.params["w"], 1.0 - 1000.0)              # only the last step applied
    assert float(state.loss_scale["scale"]) == 64.0 and int(state.loss_scale["good_steps"]) == 1


def test_damaged_checkpoint_is_an_error_not_a_fresh_start(tiny_run, tmp_path):
    import shutil

    wd = str(tmp_path / "copy")
    shutil.copytree(tiny_run.workdir, wd)
    ckpt = os.path.join(wd, "checkpoints")
    for step in os.listdir(ckpt):
        state_dir = os.path.join(ckpt, step, "state")
        if os.path.isdir(state_dir):
            for root, _, files in os.walk(state_dir):
                for f in files:
                    if f != "_METADATA":
                        os.remove(os.path.join(root, f))
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be restored \(step \d+: "):
        jaxgen.load_run(wd)


# -- model state (non-parameter collections updated by the forward pass) ----------------------
def _running_mean_loss(params, model_state, batch, key):
    """A stateful objective: fit params["w"] to the batch mean; model_state keeps a running mean
    and a count of the batches seen (like BatchNorm's batch_stats)."""
    x = batch["x"]
    loss = jnp.mean((params["w"] - x) ** 2)
    new = {"stats": {"mean": 0.9 * model_state["stats"]["mean"] + 0.1 * jnp.mean(x),
                     "count": model_state["stats"]["count"] + 1}}
    return loss, ({"batch_mean": jnp.mean(x)}, new)


def test_stateful_step_updates_model_state_and_the_nan_guard_keeps_it():
    from jaxgen.training.state import create_state
    from jaxgen.training.step import make_train_step
    import optax

    tx = optax.sgd(0.1)
    model_state = {"stats": {"mean": jnp.zeros(()), "count": jnp.zeros((), jnp.int32)}}
    state = create_state({"w": jnp.zeros(())}, tx, use_ema=True, model_state=model_state)
    step = jax.jit(make_train_step(_running_mean_loss, tx, ema_decay=0.9, stateful=True))
    key = jax.random.key(0)
    state, metrics = step(state, {"x": jnp.full((4,), 2.0)}, key)
    assert int(state.model_state["stats"]["count"]) == 1 and int(state.nonfinite) == 0
    np.testing.assert_allclose(state.model_state["stats"]["mean"], 0.2, rtol=1e-6)
    np.testing.assert_allclose(state.params["w"], 0.4, rtol=1e-6)  # w - 0.1 * 2 (w - 2)
    before = jax.tree_util.tree_map(np.asarray, state)
    state, metrics = step(state, {"x": jnp.array([1.0, jnp.nan, 0.0, 0.0])}, key)  # NaN loss: refused
    assert int(state.nonfinite) == 1 and int(state.step) == 2 and not np.isfinite(float(metrics["loss"]))
    for name in ("params", "opt_state", "ema_params", "model_state"):
        for a, b in zip(jax.tree_util.tree_leaves(getattr(state, name)), jax.tree_util.tree_leaves(getattr(before, name))):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)
    state, _ = step(state, {"x": jnp.zeros((4,))}, key)  # training goes on from the kept state
    assert int(state.model_state["stats"]["count"]) == 2
    np.testing.assert_allclose(state.model_state["stats"]["mean"], 0.18, rtol=1e-6)


def test_nan_in_the_new_model_state_alone_refuses_the_step():
    from jaxgen.training.state import create_state
    from jaxgen.training.step import make_train_step
    import optax

    def loss(params, model_state, batch, key):  # finite loss and gradient, poisoned state
        return jnp.sum(params["w"] ** 2), ({}, {"m": model_state["m"] * batch["scale"]})

    tx = optax.sgd(0.1)
    state = create_state({"w": jnp.ones(())}, tx, use_ema=False, model_state={"m": jnp.ones(())})
    step = jax.jit(make_train_step(loss, tx, stateful=True))
    state, _ = step(state, {"scale": jnp.float32(jnp.inf)}, jax.random.key(0))
    assert int(state.nonfinite) == 1 and float(state.model_state["m"]) == 1.0 and float(state.params["w"]) == 1.0


def test_checkpoints_of_runs_without_model_state_keep_their_layout(tiny_run, tmp_path):
    """A run without model state stores no model_state entry, and a checkpoint written before
    TrainState had the field (the bare five-field dataclass) still loads."""
    import shutil

    import flax
    import orbax.checkpoint as ocp

    from jaxgen.training.checkpoint import Checkpointer

    wd = str(tmp_path / "old_layout")
    shutil.copytree(tiny_run.workdir, wd)
    folder = os.path.join(wd, "checkpoints")
    step = Checkpointer(folder, read_only=True).latest_step()
    with open(os.path.join(folder, str(step), "state", "_METADATA")) as f:
        keys = {k.split(",")[0].strip("(')") for k in json.load(f)["tree_metadata"]}
    assert keys == {"step", "params", "opt_state", "ema_params", "nonfinite"}

    @flax.struct.dataclass
    class OldTrainState:  # jaxgen's TrainState before model_state existed
        step: jax.Array
        params: object
        opt_state: object
        ema_params: object
        nonfinite: jax.Array

    run = jaxgen.load_run(wd)
    trainer = Trainer(run.config, wd)
    new = trainer.checkpointer.restore(trainer.abstract_state())[0]
    old = OldTrainState(new.step + 5, new.params, new.opt_state, new.ema_params, new.nonfinite)
    trainer.checkpointer.manager.save(int(old.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(old), config=ocp.args.JsonSave(json.loads(run.config.to_json()))))
    trainer.checkpointer.close()
    again = jaxgen.load_run(wd)
    assert again.step == run.step + 5 and again.model_state is None
    for a, b in zip(jax.tree_util.tree_leaves(again.params), jax.tree_util.tree_leaves(run.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
