"""jaxgen: generative image models in JAX/Flax, exact against the PyTorch references.

Importing ``jaxgen`` is light: the public names below load their modules on first use, and
nothing here imports torch or TensorFlow.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute"; resolved lazily by __getattr__ (PEP 562).
_EXPORTS = {
    "load_run": "jaxgen.training.run:load_run",
    "Run": "jaxgen.training.run:Run",
    "load_pretrained": "jaxgen.convert.pretrained:load_pretrained",
    "save_pretrained": "jaxgen.convert.pretrained:save_pretrained",
    "load_tokenizer": "jaxgen.tokenizer:load_tokenizer",
    "scheduler_from_config": "jaxgen.diffusion.schedulers:scheduler_from_config",
    "StableDiffusionPipeline": "jaxgen.pipelines:StableDiffusionPipeline",
    "StableDiffusionControlNetPipeline": "jaxgen.pipelines:StableDiffusionControlNetPipeline",
    "load_lora": "jaxgen.lora:load_lora",
    "save_lora": "jaxgen.lora:save_lora",
    "init_lora": "jaxgen.lora:init_lora",
    "merge_lora": "jaxgen.lora:merge",
    "TextToVideoSDPipeline": "jaxgen.pipelines:TextToVideoSDPipeline",
    "StableDiffusionInstructPix2PixPipeline": "jaxgen.pipelines:StableDiffusionInstructPix2PixPipeline",
    "StableDiffusionUpscalePipeline": "jaxgen.pipelines:StableDiffusionUpscalePipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxgen' has no attribute {name!r}")
    module_name, attr = _EXPORTS[name].split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
