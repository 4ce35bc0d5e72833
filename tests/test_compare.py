"""The layer-by-layer comparison tool names the first module that diverges."""
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest
import torch

import jaxgen
from jaxgen.convert.compare import compare_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    import diffusers

    torch.manual_seed(0)
    m = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                              layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                              attention_head_dim=4)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    folder = str(tmp_path_factory.mktemp("unet"))
    m.save_pretrained(folder)
    return folder


def test_matching_port_reports_every_block(unet_folder):
    report = compare_folder(unet_folder)
    assert report.output_error < 1e-5 and report.first_divergence is None
    compared = {r.name for r in report.rows if r.rel_error is not None}
    assert {"conv_in", "down_blocks.1.attentions.0", "mid_block", "up_blocks.0.resnets.1"} <= compared


def test_names_the_first_diverging_block(unet_folder):
    _, params = jaxgen.load_pretrained(unet_folder)
    bad = jax_tree_copy(params)
    k = bad["up_blocks_0"]["resnets_0"]["conv2"]["kernel"]
    bad["up_blocks_0"]["resnets_0"]["conv2"]["kernel"] = k * 1.01
    report = compare_folder(unet_folder, params=bad)
    assert report.first_divergence.name == "up_blocks.0.resnets.0.conv2"
    assert report.output_error > 1e-4
    assert "first divergence: up_blocks.0.resnets.0.conv2" in report.format()


def jax_tree_copy(tree):
    return {k: jax_tree_copy(v) if isinstance(v, dict) else jnp.array(v) for k, v in tree.items()}


def test_cli(unet_folder):
    out = subprocess.run([sys.executable, "-m", "train.compare", unet_folder, "--rows=5"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no module above the tolerance" in out.stdout
