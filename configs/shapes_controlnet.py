"""python -m train --config configs/shapes_controlnet.py --workdir runs/shapes_controlnet --config.base_run=runs/shapes_ldm

A ControlNet on the shapes' masks (white on black, 32x32), trained on a finished, frozen shapes
latent-diffusion run (configs/shapes_ldm.py; ``base_run``): diffusers' from_unet start (the
U-Net's encoder, zero convolutions), the base's own diffusion objective, only the ControlNet in
the optimizer and the checkpoints. Training examples: the shapes train split with its masks, its
captions (a third of them replaced by the colour-only "a red shape"), half of them dropped to the
empty prompt, plus random binary 4x4 grid patterns in one colour ("a red pattern"; the "QR code"
exercise) as a quarter as many extra examples.
``python -m train.sample --workdir runs/shapes_controlnet --control mask.png --prompt "a red shape" --out x.png``
``python -m train.eval --workdir runs/shapes_controlnet``: mask IoU, colour read-back, prompt
against mask, the QR exercise (docs/CONTROLNET.md).
``python -m train.export --workdir runs/shapes_controlnet --out DIR``: a diffusers
StableDiffusionControlNetPipeline folder (the base's stack + controlnet/).

Arguments: tiny (2 steps of batch 16, for tests; base_run must then be a tiny shapes_ldm run).
"""
import ml_collections

from configs.common import base_config, data_options, make_tiny, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny",))
    c = base_config()
    c.task = "controlnet"
    c.base_run = "runs/shapes_ldm"
    c.data = ml_collections.ConfigDict({"name": "shapes", "train_split": "train", "eval_split": "test",
                                        "heldout_split": "heldout", "data_dir": "",
                                        "options": data_options(masks=True)})
    # every other ControlNet field is the base U-Net's (diffusers' ControlNetModel.from_unet)
    c.model_class = "jaxgen.nn.controlnet:ControlNetModel"
    c.model = ml_collections.ConfigDict({"conditioning_embedding_out_channels": (16, 32, 64),   # factor 4
                                         "conditioning_channels": 3})
    c.controlnet = ml_collections.ConfigDict({
        "control_field": "mask", "caption_dropout": 0.5, "color_caption_prob": 0.33,
        "pattern_fraction": 0.25, "pattern_cells": 4,
    })
    c.sampling = ml_collections.ConfigDict({"num_steps": None, "guidance_scale": None})   # None: the base's
    c.eval = ml_collections.ConfigDict({"samples_per_mask": 1, "scales": (0.5, 1.0, 1.5), "patterns": 60})
    c.batch_size = 64
    c.total_steps = 1500
    c.checkpoint_every = 500
    c.log_every = 50
    c.image_every = 0
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.ema = ml_collections.ConfigDict({"decay": 0.999, "warmup": True})
    if "tiny" in words:
        make_tiny(c)
        c.model.conditioning_embedding_out_channels = (8, 16)     # the tiny base's factor 2
        c.eval.patterns = 6
    return c
