"""Export a trained text-to-image run as one diffusers ``StableDiffusionPipeline`` folder.

    from jaxgen.pipelines.export import export_stable_diffusion
    export_stable_diffusion("runs/shapes_ldm", "runs/shapes_ldm_diffusers")
    # then, in PyTorch:  diffusers.StableDiffusionPipeline.from_pretrained("runs/shapes_ldm_diffusers")
    # or in JAX:         jaxgen.StableDiffusionPipeline.from_pretrained("runs/shapes_ldm_diffusers")

The folder is diffusers' ``save_pretrained`` layout:

    model_index.json   {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers",
                       "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                       "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer":
                       ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", CLASS],
                       "safety_checker" / "feature_extractor" / "image_encoder": [null, null],
                       "requires_safety_checker": false}
    unet/, vae/        config.json + diffusion_pytorch_model.safetensors (jaxgen.save_pretrained);
                       vae/config.json carries the run's latent scaling_factor
    text_encoder/      config.json + model.safetensors (the CLIP text tower, transformers layout)
    tokenizer/         vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/         scheduler_config.json: the run's default sampler (to_config of the jaxgen
                       scheduler, built from the training schedule)

Runs trained on a frozen base write their own pipeline class (``components["pipeline_class"]``)
and parts: a ControlNet run adds controlnet/ (StableDiffusionControlNetPipeline), an
InstructPix2Pix run writes its 8-channel unet/ (StableDiffusionInstructPix2PixPipeline), an
upscale run its 7-channel unet/, low_res_scheduler/ and max_noise_level
(StableDiffusionUpscalePipeline), a LoRA run the base folder plus lora/pytorch_lora_weights.safetensors
(diffusers' ``pipe.load_lora_weights(folder + "/lora")``), a video run its UNet3DConditionModel
and text tower as a TextToVideoSDPipeline folder (no safety-checker entries: that class has none).

A run can be exported when its task offers ``pipeline_components(params)`` (the ldm task does).
Those components are also what the run samples with: the ldm task's ``run.sample`` is a
``jaxgen.StableDiffusionPipeline`` of them (``LDMTask.pipeline``), so the folder written here
samples as the run does, in jaxgen and in diffusers.
The folder is written beside its destination and renamed into place, so a failed export leaves
nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from jaxgen.convert.pretrained import DIFFUSERS_VERSION, save_pretrained
from jaxgen.errors import ConfigError

MODEL_INDEX = "model_index.json"
# the components a StableDiffusionPipeline folder names, with their library and class
MODEL_COMPONENTS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers"}
NULL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
# pipeline classes whose constructor has no safety checker (nor the null entries above)
NO_SAFETY_CHECKER = ("TextToVideoSDPipeline",)
# scheduler fields diffusers' StableDiffusionPipeline overrides when it loads a folder (it sets
# steps_offset to 1 and clip_sample to False): a run sampling otherwise would not be reproduced
PIPELINE_SCHEDULER_FIELDS = {"steps_offset": 1, "clip_sample": False}


def check_scheduler(scheduler) -> None:
    """A ConfigError if diffusers' StableDiffusionPipeline would change ``scheduler``'s config on
    loading (steps_offset != 1, clip_sample True), naming the fields to set in the run's
    sampling.scheduler_config."""
    cfg = scheduler.to_config()
    bad = {k: cfg[k] for k, v in PIPELINE_SCHEDULER_FIELDS.items() if k in cfg and cfg[k] != v}
    if bad:
        want = ", ".join(f"{k}={PIPELINE_SCHEDULER_FIELDS[k]!r}" for k in bad)
        raise ConfigError(f"the run's {type(scheduler).__name__} has {bad}; diffusers' StableDiffusionPipeline "
                          f"replaces these with {want} when it loads a folder, so the export would not sample "
                          f"as the run does. Train with sampling.scheduler_config setting {want}.")


def model_components(components: dict[str, Any]) -> list[str]:
    """The names of the model entries of ``components``: unet, vae, text_encoder, then any other
    (module, params) pair (a ControlNet, ...)."""
    for name in MODEL_COMPONENTS:
        if name not in components:
            raise ConfigError(f"the run's pipeline components lack {name!r}; a Stable Diffusion folder needs "
                              f"{', '.join(MODEL_COMPONENTS)}.")
    others = [k for k, v in components.items() if k not in MODEL_COMPONENTS and isinstance(v, tuple)
              and len(v) == 2 and hasattr(v[0], "pt_class_name")]
    return list(MODEL_COMPONENTS) + sorted(others)


def model_index(components: dict[str, Any]) -> dict[str, Any]:
    """The model_index.json dict of a StableDiffusionPipeline with ``components`` (as returned by
    a task's ``pipeline_components``): diffusers' own layout, no safety checker (null entries, or
    none for a class without one: NO_SAFETY_CHECKER). The class is
    components["pipeline_class"] when given (e.g. "StableDiffusionControlNetPipeline"), and every
    further (module, params) entry (e.g. "controlnet") is listed with its library and class."""
    index: dict[str, Any] = {"_class_name": components.get("pipeline_class", "StableDiffusionPipeline"),
                             "_diffusers_version": DIFFUSERS_VERSION}
    if index["_class_name"] not in NO_SAFETY_CHECKER:
        for name in NULL_COMPONENTS:
            index[name] = [None, None]
        index["requires_safety_checker"] = False
    index["scheduler"] = ["diffusers", type(components["scheduler"]).__name__]
    for name in model_components(components):
        module, _ = components[name]
        index[name] = [module.pt_library, module.pt_class_name()]
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    for name in extra_schedulers(components):
        index[name] = ["diffusers", type(components[name]).__name__]
    for name, value in components.items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and name != "pipeline_class":
            index[name] = value                    # plain pipeline options, e.g. max_noise_level
    return dict(sorted(index.items()))


def extra_schedulers(components: dict[str, Any]) -> list[str]:
    """Scheduler entries besides "scheduler" (e.g. the upscaler's "low_res_scheduler")."""
    from jaxgen.diffusion.schedulers.base import Scheduler

    return sorted(k for k, v in components.items() if k != "scheduler" and isinstance(v, Scheduler))


def export_stable_diffusion(run, folder: str | os.PathLike, *, overwrite: bool = False,
                            dtype=None) -> str:
    """Write ``run`` (a jaxgen.Run, or a run directory) as a diffusers StableDiffusionPipeline
    folder at ``folder``.

    overwrite: replace an existing non-empty folder (otherwise that is an error).
    dtype: cast the saved weights (e.g. numpy.float16); None keeps float32.
    Returns the folder path.
    """
    if isinstance(run, (str, os.PathLike)):
        from jaxgen.training.run import load_run

        run = load_run(run)
    components_of = getattr(run.task, "pipeline_components", None)
    if components_of is None:
        raise ConfigError(f"a {run.task.name!r} run is not a text-to-image stack: only runs whose task "
                          "offers pipeline_components (e.g. configs/shapes_ldm.py) export to diffusers.")
    components = components_of(run.params)
    check_scheduler(components["scheduler"])
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise ConfigError(f"{folder} exists and is not a folder; choose another --out.")
        if os.listdir(folder) and not overwrite:
            raise ConfigError(f"{folder} exists and is not empty; choose another --out or pass "
                              "overwrite=True (--overwrite) to replace it.")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=parent)
    try:
        for name in model_components(components):
            module, params = components[name]
            save_pretrained(module, params, os.path.join(tmp, name), dtype=dtype)
        components["tokenizer"].save(os.path.join(tmp, "tokenizer"))
        components["scheduler"].save_config(os.path.join(tmp, "scheduler"))
        for name in extra_schedulers(components):
            components[name].save_config(os.path.join(tmp, name))
        if "lora" in components:       # a LoRA run: its adapters beside the base, in diffusers' layout
            from jaxgen.lora import save_lora

            save_lora(os.path.join(tmp, "lora"), components["lora"])
        with open(os.path.join(tmp, MODEL_INDEX), "w", encoding="utf-8") as f:
            json.dump(model_index(components), f, indent=2)
            f.write("\n")
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return folder
