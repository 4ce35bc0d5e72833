"""Every config under configs/: its ':tiny' variant trains two jitted steps through the real
engine, and its docstring starts with the command that runs it.

A config whose ':tiny' run a module of its own trains end to end (all stages, then sampling and
evaluation) is not trained twice: TRAINED_ELSEWHERE names that module, and a test checks that it
really trains that config.
"""
import glob
import importlib
import os

import pytest

from jaxgen.training.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "common")))
TRAINED_ELSEWHERE = {"shapes_ldm": "test_ldm.py", "digits_vqvae": "test_vqvae_training.py",
                     "shapes_controlnet": "test_controlnet_training.py", "shapes_ip2p": "test_ip2p_training.py",
                     "shapes_upscale": "test_upscale_training.py", "shapes_lora": "test_lora_training.py",
                     "paired_colorize": "test_paired.py", "shapes_video": "test_video_training.py",
                     "shapes_clip": "test_clip_training.py", "digits_ae": "test_autoencoders.py",
                     "digits_dae": "test_autoencoders.py", "digits_sparse_ae": "test_autoencoders.py"}


def get_config(name, arg="tiny"):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_tiny_config_trains_two_jitted_steps(name, tmp_path, data_dir):
    doc = importlib.import_module(f"configs.{name}").__doc__
    assert doc.startswith(f"python -m train --config configs/{name}.py")
    c = get_config(name)
    assert c.batch_size % 8 == 0 and c.total_steps == 2
    if name in TRAINED_ELSEWHERE:
        return
    run = train(c, str(tmp_path / name))
    assert run.step == 2


@pytest.mark.parametrize("name,module", sorted(TRAINED_ELSEWHERE.items()))
def test_configs_trained_elsewhere_are(name, module):
    """The module named trains this config's ':tiny' run with the engine's train(): by name
    (`configs.NAME ... get_config("tiny")`) or as a `("NAME", "tiny", ...)` parametrisation."""
    assert name in CONFIGS
    source = open(os.path.join(ROOT, "tests", module), encoding="utf-8").read()
    by_name = (f"configs.{name}" in source or f"from configs import {name}" in source) \
        and 'get_config("tiny")' in source
    parametrized = f'("{name}", "tiny",' in source and 'import_module(f"configs.{name}")' in source
    assert (by_name or parametrized) and "train(" in source
