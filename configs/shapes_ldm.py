"""python -m train --config configs/shapes_ldm.py --workdir runs/shapes_ldm

Text-to-image latent diffusion on the embedded shapes, from scratch, in one command: three stages
in one run directory (DIR/checkpoints/{vae,text,unet}), each resuming by itself:
  vae:  a KL autoencoder (AutoencoderKL, 16/32/32 channels, 32x32x3 -> 8x8x4 latents) by MSE +
        beta * KL; the latents' scaling factor is then set from the data (1 / their std);
  text: a CLIP model (text and image towers, width 64) trained contrastively on the captions in
        their six phrasings; its text tower, frozen, gives the U-Net its 77 x 64 context;
  unet: a UNet2DConditionModel (32/64/64 channels at 8x8/4x4/2x2, cross-attention at 8x8, 4x4
        and in the mid block) on the scaled latents: v-prediction on the scaled_linear schedule
        rescaled to zero terminal SNR, 10% caption dropout (the empty prompt) for guidance, latent
        and text caches, EMA with warm-up.
Sampling defaults (the settings the targets are stated for): c.sampling below.
``python -m train.sample --workdir runs/shapes_ldm --prompt "a large red circle on the left" --num 8 --out red.png``
``python -m train.eval --workdir runs/shapes_ldm``: prompt adherence on all 180 combinations (the
18 held out of training apart), read back by the shapes analyzer; the autoencoder's
reconstruction error; prompt -> image grids (docs/LDM.md).
``python -m train.export --workdir runs/shapes_ldm --out runs/shapes_ldm_diffusers``: a diffusers
StableDiffusionPipeline folder.

Arguments (comma-separated after ':'): tiny (every stage 2 steps of batch 16, for tests); demo (a
shorter schedule for ``make demo``: 11 min 10 s of training measured on 2 idle CPU cores, 7 min 44 s to
8 min 51 s on a faster machine, docs/LDM.md).
"""
import math

import ml_collections

from configs.common import base_config, data_options, make_tiny, parse_arg, with_stage_init_from

VOCAB = 596   # the BPE vocabulary the shapes captions (six phrasings) support; start/end ids last


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "demo"))
    if {"tiny", "demo"} <= words:
        raise ValueError("config arguments 'tiny' and 'demo' exclude each other: pick one.")
    c = base_config()
    c.task = "ldm"
    c.data = ml_collections.ConfigDict({"name": "shapes", "train_split": "train", "eval_split": "test",
                                        "heldout_split": "heldout", "data_dir": "", "options": data_options(),
                                        "augment_captions": True})   # the text stage's phrasings
    # the run's model (run.model): the denoiser on 8x8x4 latents; attention_head_dim is the head COUNT
    c.model_class = "jaxgen.nn.unet:UNet2DConditionModel"
    c.model = ml_collections.ConfigDict({
        "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": (32, 64, 64), "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 4, "cross_attention_dim": 64, "norm_num_groups": 8,
    })
    c.tokenizer = ml_collections.ConfigDict({"min_frequency": 2, "train_context": 16})
    # Zero terminal SNR + v-prediction: SD's scaled_linear schedule keeps alpha_bar = 0.0047 at
    # t = 999, so training latents there still carry their layout, which sampling's pure noise
    # lacks. Measured at 1000 U-Net steps (demo stages, docs/LDM.md): shape adherence 0.49 with
    # epsilon / min-SNR-5, 0.64 with v / zero terminal SNR / uniform weights. (min-SNR weights
    # a v loss by min(SNR, g) / (SNR + 1), which is 0 at SNR 0: hence uniform.)
    c.diffusion = ml_collections.ConfigDict({
        "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction", "loss_weighting": "uniform", "snr_gamma": 5.0,
        "caption_dropout": 0.1,
        "scaling_factor": 0.0,     # 0: 1 / std of the training latents, measured after the vae stage
        "cache_latents": True,     # encode the training set once (the autoencoder is frozen)
        "stats_images": 0,         # training images the scaling factor is measured on (0: all)
    })
    c.sampling = ml_collections.ConfigDict({
        # guidance 1.5: measured on the default run (docs/LDM.md), shape 0.871 at 3.0, 0.912 at 2.0,
        # 0.940 at 1.5 (600-step text stage); squares come out rounder (read as circles) the higher
        # the scale
        "scheduler": "DDIMScheduler", "num_steps": 25, "guidance_scale": 1.5,
        # clip_sample False and steps_offset 1: what diffusers' StableDiffusionPipeline imposes on
        # the scheduler it loads, so the exported folder samples as the run does
        "scheduler_config": ml_collections.ConfigDict({"timestep_spacing": "trailing", "clip_sample": False,
                                                       "steps_offset": 1}),
        "batch_size": 256,         # images per compiled sampling call
    })
    c.eval = ml_collections.ConfigDict({
        "samples_per_prompt": 4,   # x 180 combinations
        "guidance_scales": (),     # extra guidance scales to measure adherence at
        "grid_prompts": ("a large red circle on the left", "a small blue square at the top",
                         "a large green triangle in the center", "a small yellow circle on the right",
                         "a large magenta square at the bottom", "a small cyan triangle on the left"),
    })
    c.batch_size = 64
    c.total_steps = 3000
    c.checkpoint_every = 500
    c.log_every = 50
    c.image_every = 0              # python -m train.eval writes the figures
    c.stages = ml_collections.ConfigDict({
        "vae": {
            "model_class": "jaxgen.nn.vae:AutoencoderKL",
            "model": {"in_channels": 3, "out_channels": 3, "sample_size": 32, "latent_channels": 4,
                      "block_out_channels": (16, 32, 32),
                      "down_block_types": ("DownEncoderBlock2D",) * 3,
                      "up_block_types": ("UpDecoderBlock2D",) * 3,
                      "layers_per_block": 1, "norm_num_groups": 8, "mid_block_add_attention": False},
            "objective": {"reconstruction": "mse", "beta": 1e-4},
            "batch_size": 32, "total_steps": 1000, "checkpoint_every": 500,
            "optim": {"lr": 2e-3, "warmup_steps": 100, "weight_decay": 0.0},
        },
        "text": {
            "model_class": "jaxgen.nn.clip:CLIPModel",
            "model": {
                "text_config": {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 256,
                                "num_hidden_layers": 2, "num_attention_heads": 4,
                                "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                                "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1,
                                "pad_token_id": VOCAB - 1, "projection_dim": 64},
                "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
                                  "num_channels": 3, "hidden_act": "quick_gelu", "projection_dim": 64},
                "projection_dim": 64, "logit_scale_init_value": math.log(1 / 0.07),
            },
            "objective": {"max_logit_scale": 100.0, "attribute_targets": 0.0},
            # 1,200 steps (~90 s): 300 left the demo's position at chance, 600 place every shape,
            # 1,200 also raise shape (docs/LDM.md: demo 0.78 -> 0.80, default 0.940 -> 0.949)
            "batch_size": 128, "total_steps": 1200, "checkpoint_every": 300,
            "optim": {"lr": 2e-3, "warmup_steps": 50, "weight_decay": 1e-4},
        },
        "unet": {
            "batch_size": 64, "total_steps": 3000, "checkpoint_every": 500,
            "optim": {"lr": 1e-3, "warmup_steps": 100, "weight_decay": 0.0},
            "ema": {"decay": 0.999},
        },
    })
    if "demo" in words:
        # measured one change at a time (docs/LDM.md, "The demo"): the full text stage, a shorter
        # autoencoder and U-Net; guidance 2 beats 3 and 1.5 on shape (0.78 vs 0.71, 0.74) at
        # 1,000 U-Net steps
        c.stages.vae.total_steps = 600
        # a smoother latent space (KL weight 1e-3 instead of 1e-4): shape 0.732 -> 0.779, held-out
        # 0.667 -> 0.806 (two training seeds, three sample sets each; docs/LDM.md, row H); 1e-2
        # costs the autoencoder its squares
        c.stages.vae.objective.beta = 1e-3
        c.stages.unet.total_steps = 1000
        c.total_steps = 1000
        c.sampling.guidance_scale = 2.0
        c.eval.samples_per_prompt = 2
    if "tiny" in words:
        make_tiny(c)
        for stage in c.stages.values():   # every stage: 2 steps of batch 16
            stage.batch_size = 16
            stage.total_steps = 2
            stage.checkpoint_every = 2
            stage.optim.warmup_steps = 1
        text = c.stages.text.model
        for tower in (text.text_config, text.vision_config):
            tower.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "projection_dim": 16})
        text.projection_dim = 16
        c.model.cross_attention_dim = 32
        vae = c.stages.vae.model         # two narrow levels: 32x32x3 -> 16x16x4, less to compile
        vae.block_out_channels = (8, 16)
        vae.down_block_types = ("DownEncoderBlock2D",) * 2
        vae.up_block_types = ("UpDecoderBlock2D",) * 2
        c.diffusion.cache_latents = False   # the per-step encoder path; only stats_images encoded
        c.diffusion.stats_images = 256
        c.model.sample_size = 16
        c.model.block_out_channels = (16,)          # one level: every layer kind, least to compile
        c.model.down_block_types = ("CrossAttnDownBlock2D",)
        c.model.up_block_types = ("CrossAttnUpBlock2D",)
        c.model.attention_head_dim = 2
        c.model.norm_num_groups = 8
        c.sampling.num_steps = 3
        c.sampling.batch_size = 32
        c.eval.samples_per_prompt = 1
    return with_stage_init_from(c)
