"""jaxgen's persistent compilation cache (jaxgen/compile_cache.py) and the trainer's compile time.

The cache is checked in fresh processes (a cache only matters across processes): a tiny jaxgen
program run through the CLI's shared entry (train.common.run) twice with the cache on writes
entries the first time and loads them the second (JAX's own cache hit / miss events, and the
directory does not grow); JAXGEN_COMPILATION_CACHE=0 leaves it off. The test session sets
JAX_COMPILATION_CACHE_DIR (conftest.py): the subprocesses here drop it, as a user would not have it.
"""
import json
import os
import subprocess
import sys

import jax
import pytest

from configs.digits_ae import get_config
from jaxgen import compile_cache
from jaxgen.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted jaxgen module (a TimestepEmbedding init and forward) run under the CLI's entry point; prints what the
# process saw: the cache directory in use, JAX's persistent-cache events, the compile seconds.
PROGRAM = r"""
import collections, json, sys
from train import common

def main(argv):
    import jax, jax.numpy as jnp
    from jaxgen import compile_cache
    from jaxgen.nn.layers import TimestepEmbedding

    events = collections.Counter()
    jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
    block = TimestepEmbedding(time_embed_dim=16)
    x = jnp.ones((2, 8))
    params = jax.jit(block.init)(jax.random.key(0), x)
    y = jax.jit(block.apply)(params, x)
    print(json.dumps({"dir": jax.config.jax_compilation_cache_dir,
                      "enabled": compile_cache.enable_compilation_cache(),
                      "max_size": jax.config.jax_compilation_cache_max_size,
                      "min_compile": jax.config.jax_persistent_cache_min_compile_time_secs,
                      "hits": events["/jax/compilation_cache/cache_hits"],
                      "misses": events["/jax/compilation_cache/cache_misses"],
                      "compile_seconds": sum(compile_cache.compile_seconds().values()),
                      "sum": float(y.sum())}))

common.run(main, argv=["program"])
"""


def _program(**env_extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAXGEN_COMPILATION_CACHE", "JAXGEN_COMPILATION_CACHE_DIR",
                        "PYTEST_CURRENT_TEST")}
    # conftest's JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 stays: the tiny programs are written
    env.update(JAX_PLATFORMS="cpu", **env_extra)
    out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith("-cache"))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    folder = str(home / "xla")
    first = _program(JAXGEN_COMPILATION_CACHE_DIR=folder)
    after_first = _entries(folder)
    second = _program(JAXGEN_COMPILATION_CACHE_DIR=folder)
    return folder, first, after_first, second


def test_second_process_loads_what_the_first_compiled(two_runs):
    folder, first, after_first, second = two_runs
    assert first["dir"] == first["enabled"] == folder
    assert first["max_size"] > 0                  # JAX reads and writes entries under a file lock
    assert first["min_compile"] == 0.0            # the threshold set for JAX (conftest.py) is kept
    assert first["misses"] >= 2 and first["hits"] == 0, first        # init and apply compiled, written
    assert any(name.startswith("jit_apply-") for name in after_first), after_first
    assert second["hits"] >= 2 and second["misses"] == 0, second     # both loaded, nothing compiled
    assert _entries(folder) == after_first
    assert second["sum"] == first["sum"]
    print(f"\ncompile seconds: first process {first['compile_seconds']:.3f}, "
          f"second {second['compile_seconds']:.3f} (cache loads)")


def test_switched_off_by_the_environment(tmp_path):
    folder = str(tmp_path / "xla")
    out = _program(JAXGEN_COMPILATION_CACHE_DIR=folder, JAXGEN_COMPILATION_CACHE="off")
    assert out["dir"] is None and out["enabled"] is None and out["hits"] == out["misses"] == 0, out
    assert not os.path.exists(folder)


def test_a_users_own_jax_cache_is_kept(tmp_path, monkeypatch):
    # this session's JAX_COMPILATION_CACHE_DIR (conftest.py) is the user's own: kept as it is
    own = jax.config.jax_compilation_cache_dir
    assert own == os.environ["JAX_COMPILATION_CACHE_DIR"]
    monkeypatch.setenv("JAXGEN_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))
    assert compile_cache.enable_compilation_cache() == own
    assert jax.config.jax_compilation_cache_dir == own and jax.config.jax_compilation_cache_max_size == -1
    assert not os.path.exists(tmp_path / "xla")


def test_a_bad_switch_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("JAXGEN_COMPILATION_CACHE", "maybe")
    with pytest.raises(ConfigError, match="JAXGEN_COMPILATION_CACHE='maybe'.*set it to 0"):
        compile_cache.enable_compilation_cache()
    monkeypatch.delenv("JAXGEN_COMPILATION_CACHE_DIR", raising=False)
    for value in ("0", "off", "OFF", "false", "no"):
        monkeypatch.setenv("JAXGEN_COMPILATION_CACHE", value)
        assert compile_cache.cache_dir() is None
    monkeypatch.setenv("JAXGEN_COMPILATION_CACHE", "1")
    assert compile_cache.cache_dir() == os.path.expanduser(os.path.join("~", ".cache", "jaxgen", "xla"))


def test_trainer_logs_the_step_compile_time_once(tmp_path, data_dir):
    from jaxgen.training.trainer import train

    run = train(get_config("tiny,dense"), str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(os.path.join(run.workdir, "metrics.jsonl"))]
    assert len(rows) == run.step == 2
    first = rows[0]
    assert 0 < first["trace_seconds"] < first["compile_seconds"], first
    assert all("compile_seconds" not in r and "trace_seconds" not in r for r in rows[1:]), rows
    assert all("loss" in r for r in rows)
