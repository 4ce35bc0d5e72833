"""python -m train --config configs/shapes_ip2p.py --workdir runs/shapes_ip2p --config.base_run=runs/shapes_ldm

InstructPix2Pix on shapes: a finished, frozen shapes latent-diffusion run (configs/shapes_ldm.py;
``base_run``) gives the autoencoder and text encoder; its U-Net, with conv_in expanded from 4 to 8
input channels (the 4 new ones zero: ``init_from.expand``), is fine-tuned on (input, instruction,
edited) triplets the shapes generator makes (data.options.edits=True: one attribute changed, the
jitter kept; instructions such as "make it blue", "turn it into a square", "move it to the left",
"make it small", in four phrasings each), with 5% / 5% / 5% text / image / both conditioning dropout.
``python -m train.sample --workdir runs/shapes_ip2p --image in.png --prompt "make it blue" --out out.png``
``python -m train.eval --workdir runs/shapes_ip2p``: edit accuracy and preservation per instruction
kind over an image_guidance_scale sweep (docs/EDITING.md).
``python -m train.export --workdir runs/shapes_ip2p --out DIR``: a diffusers
StableDiffusionInstructPix2PixPipeline folder.

Arguments: tiny (2 steps of batch 16, for tests; base_run must then be a tiny shapes_ldm run).
"""
import ml_collections

from configs.common import base_config, data_options, make_tiny, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny",))
    c = base_config()
    c.task = "ip2p"
    c.base_run = "runs/shapes_ldm"
    c.data = ml_collections.ConfigDict({"name": "shapes", "train_split": "train", "eval_split": "test",
                                        "heldout_split": "heldout", "data_dir": "",
                                        "options": data_options(edits=True)})
    c.model_class = "jaxgen.nn.unet:UNet2DConditionModel"
    c.model = ml_collections.ConfigDict({"in_channels": 8})      # every other field: the base U-Net's
    # the base's U-Net, conv_in widened to 8 channels with zeros (a FieldReference: overriding
    # base_run moves the source too)
    c.init_from.source = c.get_ref("base_run")
    c.init_from.stage = "unet"
    c.init_from.expand = ("conv_in/kernel",)
    c.ip2p = ml_collections.ConfigDict({"source_field": "source", "instruction_field": "instruction",
                                        "text_dropout": 0.05, "image_dropout": 0.05, "both_dropout": 0.05})
    c.sampling = ml_collections.ConfigDict({"num_steps": None, "guidance_scale": None,    # None: the base's
                                            "image_guidance_scale": 1.5})
    c.eval = ml_collections.ConfigDict({"examples": 240, "image_guidance_scales": (1.0, 1.25, 1.5, 1.75, 2.0)})
    c.batch_size = 64
    c.total_steps = 2000
    c.checkpoint_every = 500
    c.log_every = 50
    c.image_every = 0
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.ema = ml_collections.ConfigDict({"decay": 0.999, "warmup": True})
    if "tiny" in words:
        make_tiny(c)
        c.eval.examples = 8
        c.eval.image_guidance_scales = (1.0, 2.0)
    return c
