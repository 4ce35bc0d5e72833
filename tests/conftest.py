"""Test set-up: CPU only, float32 matmuls at full precision, a shared prepared-data directory,
and a persistent compilation cache shared with the subprocesses the tests start (the same
program compiles once per session, not once per process)."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_session_tmp = tempfile.mkdtemp(prefix="jaxgen-tests-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_session_tmp, "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAXGEN_DATA_DIR", os.path.join(_session_tmp, "tfds"))
# The suite's programs are tiny and run a few steps each, so XLA's compilation dominates its time:
# LLVM at -O0 compiles them about a third faster (measured on the tiny shapes LDM stack: 62 s ->
# 42 s). It changes instruction selection, not floating-point semantics (no fast math either way);
# the parity tolerances and the bit-exact resume checks hold under it. Subprocesses inherit it
# (helpers.xla_flags adds a forced device count to it).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def data_dir():
    """One TFDS data dir for the whole session (embedded datasets are prepared once)."""
    return os.environ["JAXGEN_DATA_DIR"]
