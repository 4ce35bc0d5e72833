"""Tasks: what a config trains (model, objective, previews, evaluation, the Run's abilities).

Picked by ``config.task`` from this plain dict of name -> "module:class".
"""
from __future__ import annotations

import importlib

from jaxgen.errors import ConfigError

TASKS: dict[str, str] = {
    "autoencoder": "jaxgen.training.tasks.autoencoder:AutoencoderTask",
    "vae": "jaxgen.training.tasks.autoencoder:VAETask",
    "clip": "jaxgen.training.tasks.clip:ClipTask",
    "diffusion": "jaxgen.training.tasks.diffusion:DiffusionTask",
    "ldm": "jaxgen.training.tasks.ldm:LDMTask",
    "controlnet": "jaxgen.training.tasks.controlnet:ControlNetTask",
    "ip2p": "jaxgen.training.tasks.ip2p:InstructPix2PixTask",
    "upscale": "jaxgen.training.tasks.upscale:UpscaleTask",
    "lora": "jaxgen.training.tasks.lora:LoraTask",
    "mae": "jaxgen.training.tasks.mae:MAETask",
    "vqvae": "jaxgen.training.tasks.vqvae:VQVAETask",
    "video": "jaxgen.training.tasks.video:VideoTask",
}


def make_task(config):
    """The Task object for ``config.task``."""
    name = config.task
    if name not in TASKS:
        raise ConfigError(f"config.task={name!r} is unknown; choose one of {', '.join(sorted(TASKS))}.")
    module_name, attr = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)(config)
