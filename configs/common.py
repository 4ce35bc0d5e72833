"""Fields every config shares, and the ':tiny' rule."""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """The fields every run has; experiment configs fill in task, model and data."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128
    c.total_steps = 1000
    c.checkpoint_every = 500
    c.keep_checkpoints = 3        # the newest N checkpoints are kept; 0 keeps every one
    c.log_every = 50
    c.image_every = 500           # PNG preview every N steps (0 = only at the end... and never)
    c.compute_dtype = "float32"   # or "bfloat16" / "float16" (float32 params; float16 with a dynamic loss scale)
    c.nan_policy = "stop"         # "stop": a NaN/Inf loss or gradient ends the run; "skip": skip the step
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.optim = ml_collections.ConfigDict({"lr": 1e-3, "warmup_steps": 50, "weight_decay": 1e-4,
                                         "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_norm": 1.0,
                                         "final_lr_ratio": 0.0})
    c.ema = ml_collections.ConfigDict({"decay": 0.0, "warmup": True})  # decay 0 = no EMA
    # start from pretrained weights (jaxgen/training/init_from.py): source "" = off; else a
    # diffusers/transformers folder or a jaxgen run directory (stage: which stage of a multi-stage
    # run); new / drop / expand / zero: glob patterns over "/"-joined param paths
    c.init_from = init_from_off()
    return c


def data_options(**options) -> ml_collections.ConfigDict:
    """``config.data.options``: keyword options for the dataset source (jaxgen.data.load_dataset).
    Every config has ``resolution`` (unset = keep the images' size; an int resizes and
    center-crops every image field of an image folder or TFDS dataset to that square, e.g.
    ``--config.data.options.resolution=32`` for a folder whose images are not the model's
    size); ``options`` adds source options such as fields=("source", "image") for paired folders.
    Unset (None) options are not passed on."""
    o = ml_collections.ConfigDict({"resolution": ml_collections.config_dict.placeholder(int)})
    for k, v in options.items():
        o[k] = v
    return o


def init_from_off() -> ml_collections.ConfigDict:
    """The ``init_from`` field switched off (source ""): every config has it at the top level, and
    multi-stage configs in each stage entry (``with_stage_init_from``), so
    ``--config.stages.STAGE.init_from.source=...`` works from the command line."""
    from jaxgen.training.init_from import default_config

    return default_config()


def with_stage_init_from(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Give every entry of c.stages its own (switched-off) init_from; returns c."""
    for stage in c.stages.values():
        stage.init_from = init_from_off()
    return c


def parse_arg(arg: str | None, allowed: tuple[str, ...]) -> set[str]:
    """Split 'tiny,noskip' into {'tiny', 'noskip'}; an unknown word is an error naming it."""
    words = {w for w in (arg or "").split(",") if w}
    unknown = words - set(allowed)
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; this config takes {list(allowed)}")
    return words


def make_tiny(c: ml_collections.ConfigDict) -> None:
    """Seconds-long run for tests: 2 steps, batch 16 (divisible by 8 devices)."""
    c.batch_size = 16
    c.total_steps = 2
    c.checkpoint_every = 2
    c.log_every = 1
    c.image_every = 0
    c.optim.warmup_steps = 1


def digits_autoencoder(latent_dim: int, skip: bool = False, dense: bool = False) -> ml_collections.ConfigDict:
    """An autoencoder-family run on the embedded 8x8 digits (3,000 steps of batch 128)."""
    c = base_config()
    c.task = "autoencoder"
    c.data = ml_collections.ConfigDict({"name": "digits", "train_split": "train", "eval_split": "test",
                                        "data_dir": "", "options": data_options(), "exclude_labels": ()})
    if dense:
        c.model_class = "jaxgen.nn.autoencoder:DenseAutoencoder"
        c.model = ml_collections.ConfigDict({"image_size": 8, "in_channels": 1, "hidden_dims": (256, 128),
                                             "latent_dim": latent_dim, "act": "relu"})
    else:
        c.model_class = "jaxgen.nn.autoencoder:ConvAutoencoder"
        c.model = ml_collections.ConfigDict({"image_size": 8, "in_channels": 1, "channels": (32, 64),
                                             "hidden_dim": 128, "latent_dim": latent_dim, "skip": skip,
                                             "act": "relu"})
    c.objective = ml_collections.ConfigDict({"corruption": "none", "sigma": 0.5, "rho": 0.3, "l1": 0.0,
                                             "beta": 1.0})
    c.batch_size = 128
    c.total_steps = 3000
    c.checkpoint_every = 1000
    c.log_every = 100
    c.image_every = 1000
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    return c


def mae_config(dataset: str, image_size: int, channels: int, patch_size: int,
               probe_targets: tuple[str, ...]) -> ml_collections.ConfigDict:
    """A masked-autoencoder run (task "mae", jaxgen.nn.mae:MaskedAutoencoder) on an embedded dataset."""
    c = base_config()
    c.task = "mae"
    c.data = ml_collections.ConfigDict({"name": dataset, "train_split": "train", "eval_split": "test",
                                        "data_dir": "", "options": data_options()})
    c.model_class = "jaxgen.nn.mae:MaskedAutoencoder"
    c.model = ml_collections.ConfigDict({
        "image_size": image_size, "in_channels": channels, "patch_size": patch_size,
        "hidden_size": 64, "num_layers": 4, "num_heads": 4, "mlp_ratio": 4,
        "decoder_hidden_size": 64, "decoder_num_layers": 2, "decoder_num_heads": 4,
        "mask_ratio": 0.75, "pos_embed": "sincos", "hidden_act": "gelu"})
    c.objective = ml_collections.ConfigDict({"norm_pix_loss": False})
    c.eval = ml_collections.ConfigDict({"mask_draws": 4, "probe_targets": probe_targets})
    c.update({"batch_size": 128, "total_steps": 4000, "checkpoint_every": 1000, "log_every": 100,
              "image_every": 1000})
    c.optim.update({"lr": 1e-3, "warmup_steps": 100, "weight_decay": 0.05})
    c.ema.decay = 0.999
    return c


def skip_autoencoder(dataset: str, image_size: int, in_channels: int, channels: tuple[int, ...],
                     objective: dict) -> ml_collections.ConfigDict:
    """A skip-connected (U-Net style) convolutional autoencoder run without a dense code
    (latent_dim 0) on any embedded dataset, for the applications: inpainting (objective corruption
    "occlude") and colorization ("grey"). The digits autoencoder's fields, 2,000 steps of batch 64."""
    c = digits_autoencoder(latent_dim=0, skip=True)
    c.data.name = dataset
    c.model.update({"image_size": image_size, "in_channels": in_channels, "channels": channels,
                    "hidden_dim": 0})
    c.objective = ml_collections.ConfigDict({"l1": 0.0, **objective})
    c.batch_size = 64
    c.total_steps = 2000
    return c
