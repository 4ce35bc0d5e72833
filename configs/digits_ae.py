"""python -m train --config configs/digits_ae.py --workdir runs/digits_ae

Convolutional autoencoder on the embedded 8x8 digits with a 2-D code (Hinton & Salakhutdinov's
non-linear dimensionality reduction, compared against PCA by ``python -m train.eval``).
Arguments (comma-separated after ':'): tiny (seconds, for tests), skip (U-Net style skips),
dense (an MLP autoencoder instead of the convolutional one).
"""
from configs.common import base_config, make_tiny, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "skip", "dense"))
    c = base_config()
    c.task = "autoencoder"
    c.data = {"name": "digits", "train_split": "train", "eval_split": "test", "data_dir": ""}
    if "dense" in words:
        c.model_class = "jaxgen.nn.autoencoder:DenseAutoencoder"
        c.model = {"image_size": 8, "in_channels": 1, "hidden_dims": (256, 128), "latent_dim": 2, "act": "relu"}
    else:
        c.model_class = "jaxgen.nn.autoencoder:ConvAutoencoder"
        c.model = {"image_size": 8, "in_channels": 1, "channels": (32, 64), "hidden_dim": 128,
                   "latent_dim": 2, "skip": "skip" in words, "act": "relu"}
    c.batch_size = 128
    c.total_steps = 3000
    c.checkpoint_every = 1000
    c.log_every = 100
    c.image_every = 1000
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    if "tiny" in words:
        make_tiny(c)
    return c
