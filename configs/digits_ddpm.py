"""python -m train --config configs/digits_ddpm.py --workdir runs/digits_ddpm

Class-conditional DDPM on the embedded 8x8 digits: a small UNet2DModel (32 channels, attention
at 4x4) learns to denoise x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps over T = 1000 steps of the cosine
schedule; labels are replaced by the null label (id 10) 10% of the time, for classifier-free
guidance; EMA of the weights with warm-up; 3,000 steps of batch 128. Default sampling (the
settings its targets are stated for): DDIM, 50 steps, guidance 1.25 (see c.sampling).
``python -m train.sample --workdir runs/digits_ddpm --num 100 --labels 7 --out seven.png``
``python -m train.eval --workdir runs/digits_ddpm``: accuracy of class-conditional samples under an
independent SVC, Fréchet distance in its feature space next to train-vs-test, for the default
sampler, DDPM-1000, DDIM-20, DPM-Solver++-20 and guidance 1 / 1.5 / 3 (docs/DDPM.md).

Arguments (comma-separated after ':'): tiny (seconds, for tests); a prediction type
(epsilon | v_prediction | sample; default epsilon); a loss weighting (uniform | min_snr; default
min_snr); a schedule (cosine | linear; default cosine).
"""
import ml_collections

from configs.common import base_config, data_options, make_tiny, parse_arg

PREDICTIONS = ("epsilon", "v_prediction", "sample")
WEIGHTINGS = ("uniform", "min_snr")
SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


def _pick(words, options, default):
    chosen = [w for w in options if w in words]
    if len(chosen) > 1:
        raise ValueError(f"config arguments {chosen} exclude each other: pick one of {list(options)}")
    return chosen[0] if chosen else default


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", *PREDICTIONS, *WEIGHTINGS, *SCHEDULES))
    c = base_config()
    c.task = "diffusion"
    c.data = ml_collections.ConfigDict({"name": "digits", "train_split": "train", "eval_split": "test",
                                        "data_dir": "", "options": data_options()})
    c.model_class = "jaxgen.nn.unet:UNet2DModel"
    c.model = ml_collections.ConfigDict({
        "sample_size": 8, "in_channels": 1, "out_channels": 1,
        "block_out_channels": (32, 32), "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 32, "norm_num_groups": 8,
        "num_class_embeds": 11,           # digits 0-9 and the null label 10
    })
    c.diffusion = ml_collections.ConfigDict({
        "num_train_timesteps": 1000,
        "beta_schedule": SCHEDULES[_pick(words, tuple(SCHEDULES), "cosine")],
        "beta_start": 0.0001, "beta_end": 0.02,      # used by the linear schedule
        "rescale_betas_zero_snr": False,
        "prediction_type": _pick(words, PREDICTIONS, "epsilon"),
        "loss_weighting": _pick(words, WEIGHTINGS, "min_snr"),
        "snr_gamma": 5.0,
        "num_classes": 10,
        "label_dropout": 0.1,
    })
    # Sampling an epsilon model in pixel space. The cosine schedule's alpha_bar at t = 999 is
    # 2.4e-9 (sigma 2e4), where x0 = (x - sqrt(1-a) eps) / sqrt(a) multiplies the model's error by
    # 2e4: "leading" spacing starts the ladders at t <= 980 instead ("trailing" / "linspace" start
    # at 999, where Heun and PNDM fall to chance and Euler/LMS to 0.88 accuracy). thresholding
    # (with sample_max_value 1: clip x0 to [-1, 1]) for the schedulers that have it, and DDIM
    # re-deriving eps from the clipped x0, keep guided samples in range (without the latter,
    # guided DDIM falls to chance). Figures in docs/DDPM.md.
    c.sampling = ml_collections.ConfigDict({
        "scheduler": "DDIMScheduler", "num_steps": 50, "guidance_scale": 1.25,
        "scheduler_config": ml_collections.ConfigDict({"timestep_spacing": "leading",
                                                       "thresholding": True}),
        "step_options": ml_collections.ConfigDict({
            "DDIMScheduler": ml_collections.ConfigDict({"use_clipped_model_output": True})}),
    })
    c.eval = ml_collections.ConfigDict({
        "num_samples": 1000,
        "schedulers": (("DDPMScheduler", 1000), ("DDIMScheduler", 20), ("DPMSolverMultistepScheduler", 20)),
        "guidance_scales": (1.0, 1.5, 3.0),
    })
    c.batch_size = 128
    c.total_steps = 3000
    c.checkpoint_every = 1000
    c.log_every = 100
    c.image_every = 3000
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.0
    c.ema = ml_collections.ConfigDict({"decay": 0.999, "warmup": True})
    if "tiny" in words:
        make_tiny(c)
        c.model.block_out_channels = (8, 16)
        c.model.attention_head_dim = 8
        c.model.norm_num_groups = 4
        c.sampling.num_steps = 2
        c.eval.num_samples = 20
        c.eval.schedulers = (("DDPMScheduler", 2), ("DDIMScheduler", 2), ("DPMSolverMultistepScheduler", 2))
    return c
