"""Importing jaxgen (and using its training engine) never needs torch or TensorFlow."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys
for name in ("torch", "tensorflow", "diffusers", "transformers"):
    sys.modules[name] = None  # any import of these now raises ImportError
import jaxgen
assert "jax" not in sys.modules, "importing jaxgen should be light"
import jaxgen.training.trainer, jaxgen.training.run, jaxgen.data, jaxgen.convert.pretrained
import jaxgen.nn.unet, jaxgen.nn.vae, jaxgen.nn.vq, jaxgen.nn.clip, jaxgen.nn.autoencoder
import jaxgen.diffusion.schedulers, jaxgen.diffusion.sampling, jaxgen.tokenizer
for name in ("load_run", "load_pretrained", "save_pretrained", "load_tokenizer", "scheduler_from_config"):
    getattr(jaxgen, name)
print("ok")
"""


def test_import_without_torch_or_tensorflow():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
