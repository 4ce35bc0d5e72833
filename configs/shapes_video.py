"""python -m train --config configs/shapes_video.py --workdir runs/shapes_video --config.base_run=runs/shapes_ldm

Text-to-video on moving shapes (Video Diffusion Models, Ho et al.; diffusers' text-to-video
layout): a UNet3DConditionModel (space-time factorised: spatial resnets and cross-attention per
frame, temporal convolutions and temporal attention across frames) trained from scratch on 8-frame
32x32 clips of one shape moving left, right, up, down or standing still
(``jaxgen.data.shapes.moving_clips``: 6,480 training clips, "a red circle moving right", "a small
blue square moving up", "a green triangle standing still"). Latent space: the frozen shapes
autoencoder of the base run (configs/shapes_ldm.py; ``base_run``) applied per frame, 8x8x4
latents per frame, encoded once; a copy of the base's text tower trained with the U-Net
(video.train_text_encoder; docs/VIDEO.md: frozen, it cannot tell "moving up" from "moving down")
and the base's objective (v-prediction, zero-terminal-SNR schedule, latent scaling). 10% caption
dropout for guidance.
video.joint_images > 0 adds still images of the base's data as one-frame clips (joint training).
``python -m train.sample --workdir runs/shapes_video --prompt "a red circle moving right" --num 4 --out x.gif``
(an animated GIF; .png: a strip, a row per clip).
``python -m train.eval --workdir runs/shapes_video``: colour / shape per frame, direction of motion
and consistency over the 90 colour x shape x direction prompts, time and memory per clip
(docs/VIDEO.md).

Arguments: tiny (2 steps of batch 16 of 3-frame clips, a tiny U-Net, for tests; base_run must then
be a tiny shapes_ldm run).
"""
import ml_collections

from configs.common import base_config, data_options, make_tiny, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny",))
    c = base_config()
    c.task = "video"
    c.base_run = "runs/shapes_ldm"
    c.data = ml_collections.ConfigDict({"name": "shapes", "train_split": "train", "eval_split": "test",
                                        "data_dir": "", "options": data_options(
                                            moving=8, num_examples=ml_collections.config_dict.placeholder(int))})
    c.model_class = "jaxgen.nn.unet3d:UNet3DConditionModel"
    # in/out channels, cross_attention_dim and sample_size are the base run's (its latents, its text
    # tower); attention_head_dim is the HEAD SIZE in this class (diffusers' UNet3DConditionModel)
    c.model = ml_collections.ConfigDict({
        "block_out_channels": (32, 64, 64), "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        "attention_head_dim": 8, "norm_num_groups": 8,
    })
    c.video = ml_collections.ConfigDict({
        "num_frames": c.data.options.get_ref("moving"),   # the clips' frames (data.options.moving)
        "caption_dropout": 0.1,
        "temporal_dropout": True,    # the temporal convolutions' dropout 0.1 (diffusers' train mode)
        "joint_images": 0,           # still images per step as one-frame clips (0: clips only)
        # train a copy of the base's text tower with the U-Net: the frozen one never saw "up" /
        # "down" / "still" and maps "moving up" and "moving down" to nearly one context
        "train_text_encoder": True,
    })
    # guidance 2.0, not the base's 3.0: over 90 prompts it drew the shape right on every frame
    # 0.84 of the time against 0.73 (docs/VIDEO.md, the guidance sweep); num_steps None: the base's
    c.sampling = ml_collections.ConfigDict({"num_steps": None, "guidance_scale": 2.0,
                                            "batch_size": 64})                          # clips per call
    c.eval = ml_collections.ConfigDict({"samples_per_prompt": 4})     # x 90 prompts
    c.batch_size = 32
    c.total_steps = 3000          # 32 clips x 8 frames a step (docs/VIDEO.md: step time)
    c.checkpoint_every = 500
    c.log_every = 50
    c.image_every = 0              # python -m train.eval writes the figures
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.ema = ml_collections.ConfigDict({"decay": 0.999, "warmup": True})
    if "tiny" in words:
        make_tiny(c)
        c.data.options.moving = 3
        c.data.options.num_examples = 64
        c.model.block_out_channels = (8,)             # one level: every layer kind, least to compile
        c.model.down_block_types = ("CrossAttnDownBlock3D",)
        c.model.up_block_types = ("CrossAttnUpBlock3D",)
        c.model.attention_head_dim = 4
        c.model.norm_num_groups = 4
        c.video.temporal_dropout = False              # a smaller step program (tests trace the dropout path)
        c.sampling.num_steps = 2
        c.sampling.batch_size = 16
        c.eval.samples_per_prompt = 1
    return c
