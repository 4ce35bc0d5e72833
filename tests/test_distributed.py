"""The same training code on 1 device, 8 forced host devices (data=8, data=4 x fsdp=2), two
processes with 4 devices each (jax.distributed, gloo), and after a kill -9 + resume.

Each run is a subprocess of ``python -m train`` (XLA_FLAGS is read once per process).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import rel_err, xla_flags
import jaxgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20
COMMON = ["--config", "configs/digits_ae.py:tiny", f"--config.total_steps={STEPS}",
          "--config.log_every=1", f"--config.checkpoint_every={STEPS}", "--config.optim.warmup_steps=5"]


def _env(devices: int, data_dir: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXGEN_DATA_DIR=data_dir,
               XLA_FLAGS=xla_flags(devices))
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _train(workdir, devices, data_dir, extra=(), check=True, **popen):
    cmd = [sys.executable, "-m", "train", *COMMON, f"--workdir={workdir}", *extra]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices, data_dir), **popen)
    out = subprocess.run(cmd, cwd=ROOT, env=_env(devices, data_dir), capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"train failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out


def _losses(workdir) -> np.ndarray:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    by_step = {r["step"]: r["loss"] for r in rows}  # a resumed run may repeat steps: last wins
    return np.array([by_step[s] for s in range(1, STEPS + 1)])


def _params(workdir) -> np.ndarray:
    run = jaxgen.load_run(workdir)  # 1 device here, whatever wrote it
    assert run.step == STEPS
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(run.params)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp("ref1")
    _train(wd, 1, data_dir)
    return _losses(wd), _params(wd)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp("data8")
    _train(wd, 8, data_dir, extra=["--config.mesh.data=8", "--config.mesh.fsdp=1"])
    return _losses(wd), _params(wd)


def _curve_errors(run, reference) -> tuple[float, float]:
    """(max relative loss difference over the steps, relative parameter difference at the end)."""
    (losses, params), (ref_losses, ref_params) = run, reference
    return float(np.max(np.abs(losses - ref_losses) / np.abs(ref_losses))), rel_err(params, ref_params)


def test_data8_follows_one_device_curve(eight_devices, reference):
    loss_err, param_err = _curve_errors(eight_devices, reference)
    assert loss_err <= 1e-5 and param_err <= 1e-3, (loss_err, param_err)


def test_data4_fsdp2_follows_one_device_curve(reference, tmp_path, data_dir):
    wd = tmp_path / "run"
    _train(wd, 8, data_dir, extra=["--config.mesh.data=4", "--config.mesh.fsdp=2"])
    loss_err, param_err = _curve_errors((_losses(wd), _params(wd)), reference)
    assert loss_err <= 1e-5 and param_err <= 1e-3, (loss_err, param_err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_eight_devices(eight_devices, tmp_path, data_dir):
    two = tmp_path / "two_processes"
    port = _free_port()
    procs = [_train(two, 4, data_dir, extra=[f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                             f"--process_id={i}"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
    loss_err, param_err = _curve_errors((_losses(two), _params(two)), eight_devices)
    assert loss_err <= 1e-5 and param_err <= 1e-3, (loss_err, param_err)


def test_kill_9_then_resume_is_exact(reference, tmp_path, data_dir):
    wd = tmp_path / "killed"
    # a save every step, asynchronous: the kill lands while one is being written more often than not
    proc = _train(wd, 1, data_dir, extra=["--config.checkpoint_every=1"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = wd / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(ckpt) if ckpt.is_dir() else []
        done = [int(d) for d in names if d.isdigit()]
        if done and max(done) >= 4 and any("tmp" in d for d in names):
            break  # a save is being written right now
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    names = os.listdir(ckpt)
    assert any("tmp" in d for d in names), f"the kill did not land during a save: {names}"
    killed_at = sorted(int(d) for d in names if d.isdigit())
    assert killed_at and max(killed_at) < STEPS
    _train(wd, 1, data_dir)  # resumes by itself
    assert not [d for d in os.listdir(ckpt) if "tmp" in d], os.listdir(ckpt)
    ref_losses, ref_params = reference
    assert rel_err(_params(wd), ref_params) <= 1e-6
    np.testing.assert_allclose(_losses(wd), ref_losses, rtol=1e-6)
