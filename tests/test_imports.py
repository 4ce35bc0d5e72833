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


def test_run_and_trainer_do_not_import_each_other_in_a_circle():
    """load_run needs the stage bookkeeping (jaxgen.training.stages), not the training loop:
    restoring a run of any task imports no trainer, and the trainer imports run at module level."""
    script = ("import sys, os, tempfile\n"
              "import jaxgen.training.run\n"
              "from jaxgen.training.tasks import TASKS, make_task\n"
              "import importlib\n"
              "for path in TASKS.values():\n"
              "    importlib.import_module(path.split(':')[0])\n"
              "assert 'jaxgen.training.trainer' not in sys.modules, 'run or a task imports the trainer'\n"
              "import jaxgen.training.trainer\n"
              "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
