"""Test set-up: CPU only, float32 matmuls at full precision, a shared prepared-data directory."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data dir for the whole session (embedded datasets are prepared once)."""
    path = os.environ.get("JAXGEN_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
    os.environ["JAXGEN_DATA_DIR"] = path
    return path
