"""python -m train --config configs/digits_ae.py --workdir runs/digits_ae

Convolutional autoencoder on the embedded 8x8 digits with a 2-D code (Hinton & Salakhutdinov's
non-linear dimensionality reduction), compared against PCA by ``python -m train.eval``:
reconstruction MSE and 5-NN accuracy of the 2-D codes, and a scatter plot of both.
Arguments (comma-separated after ':'): tiny (seconds, for tests), skip (U-Net style skips),
dense (an MLP autoencoder), anomaly (trains without the digit 8; eval reports its AUROC).
"""
from configs.common import digits_autoencoder, make_tiny, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "skip", "dense", "anomaly"))
    c = digits_autoencoder(latent_dim=2, skip="skip" in words, dense="dense" in words)
    if "anomaly" in words:
        c.data.exclude_labels = (8,)
    if "tiny" in words:
        make_tiny(c)
    return c
