"""python -m train.export --workdir DIR --out FOLDER [--step N] [--overwrite] [--float16]

Writes the text-to-image run in DIR (e.g. configs/shapes_ldm.py) as one diffusers
StableDiffusionPipeline folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/ (jaxgen.pipelines.export). diffusers' StableDiffusionPipeline.from_pretrained(FOLDER)
and jaxgen.StableDiffusionPipeline.from_pretrained(FOLDER) both load it. Runs trained on a frozen
base write their own diffusers pipeline: a ControlNet run a StableDiffusionControlNetPipeline
folder, an ip2p run a StableDiffusionInstructPix2PixPipeline folder, an upscale run a
StableDiffusionUpscalePipeline folder, a video run a TextToVideoSDPipeline folder, a LoRA run the base folder with lora/ (load it with
pipe.load_lora_weights(FOLDER + "/lora")).
"""
from __future__ import annotations

from absl import app, flags

from train import common

flags.DEFINE_string("workdir", None, "run directory of a text-to-image run")
flags.DEFINE_string("out", None, "folder to write (must not exist or be empty, unless --overwrite)")
flags.DEFINE_integer("step", None, "checkpoint step of the last stage (default: the newest intact one)",
                     lower_bound=0)
flags.DEFINE_bool("overwrite", False, "replace an existing non-empty --out folder")
flags.DEFINE_bool("float16", False, "save the weights as float16 (default float32)")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.setup_logging()
    import numpy as np

    import jaxgen
    from jaxgen.pipelines.export import export_stable_diffusion

    F = flags.FLAGS
    run = jaxgen.load_run(F.workdir, step=F.step)
    folder = export_stable_diffusion(run, F.out, overwrite=F.overwrite,
                                     dtype=np.float16 if F.float16 else None)
    import json
    import os

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        cls = json.load(f)["_class_name"]
    print(f"wrote {folder}: diffusers.{cls}.from_pretrained({folder!r}) loads it")


if __name__ == "__main__":
    common.run(main)
