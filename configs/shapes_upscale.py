"""python -m train --config configs/shapes_upscale.py --workdir runs/shapes_upscale --config.base_run=runs/shapes_ldm

A text-guided x4 latent upscaler on shapes (8x8 -> 32x32), in the layout of diffusers'
StableDiffusionUpscalePipeline: a U-Net on the frozen shapes autoencoder's 8x8 latents taking the
noised 8x8 image as 3 more channels and its noise level as a class label, conditioned on the
frozen text encoder. It starts from the base run's U-Net (configs/shapes_ldm.py; ``base_run``;
conv_in widened 4 -> 7 with zeros, the noise-level embedding new) and trains with noise-level
augmentation of the low-resolution input (levels 0..max_train_noise_level) and 10% caption dropout.
``python -m train.sample --workdir runs/shapes_upscale --image low.png --prompt "a small red circle on the left" --out x.png``
``python -m train.eval --workdir runs/shapes_upscale``: PSNR against bicubic, attributes read back,
text guidance on ambiguous inputs (docs/UPSCALE.md).
``python -m train.export --workdir runs/shapes_upscale --out DIR``: a diffusers
StableDiffusionUpscalePipeline folder.

Arguments: tiny (2 steps of batch 16, for tests; base_run must then be a tiny shapes_ldm run).
"""
import ml_collections

from configs.common import base_config, data_options, make_tiny, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny",))
    c = base_config()
    c.task = "upscale"
    c.base_run = "runs/shapes_ldm"
    c.data = ml_collections.ConfigDict({"name": "shapes", "train_split": "train", "eval_split": "test",
                                        "heldout_split": "heldout", "data_dir": "", "options": data_options()})
    c.model_class = "jaxgen.nn.unet:UNet2DConditionModel"
    # 4 latent + 3 low-res channels; noise levels 0..999 embedded (diffusers' x4 upscaler: 1000)
    c.model = ml_collections.ConfigDict({"in_channels": 7, "num_class_embeds": 1000})
    c.init_from.source = c.get_ref("base_run")
    c.init_from.stage = "unet"
    c.init_from.expand = ("conv_in/kernel",)
    c.init_from.new = ("class_embedding",)
    c.upscale = ml_collections.ConfigDict({
        "caption_dropout": 0.1,
        "max_noise_level": 350,           # the pipeline's limit (model_index.json), as diffusers'
        "max_train_noise_level": 350,     # noise-level augmentation: uniform in [0, this]
        "noise_level": 20,                # run.upscale's default
        # the low-res noise schedule: diffusers' x4 upscaler's low_res_scheduler
        "low_res_scheduler": ml_collections.ConfigDict({
            "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            "beta_start": 0.0001, "beta_end": 0.02}),
    })
    # the base's 25 steps; guidance 1.5, not the base's 3.0: the low-res image already fixes most of
    # the picture, and stronger text guidance over-draws it (docs/UPSCALE.md: the guidance sweep)
    c.sampling = ml_collections.ConfigDict({"num_steps": None, "guidance_scale": 1.5})
    c.eval = ml_collections.ConfigDict({"examples": 360, "ambiguous": 120})
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
        c.eval.examples = 8
        c.eval.ambiguous = 4
    return c
