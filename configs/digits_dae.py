"""python -m train --config configs/digits_dae.py --workdir runs/digits_dae

Denoising autoencoder on the 8x8 digits: the input is corrupted (Gaussian noise, sigma 0.5 in
[-1, 1] units, or with ':masking' a fraction rho = 0.3 of pixels set to black), the target is the
clean image. By default the convolutional encoder-decoder has U-Net style skips (encoder maps
concatenated into the decoder at the same resolution); ':noskip' trains the same network without
them. ``python -m train.eval`` reports the denoising MSE and writes an iterated-denoising strip.
Arguments: tiny, noskip, masking.
"""
from configs.common import digits_autoencoder, make_tiny, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "noskip", "masking"))
    c = digits_autoencoder(latent_dim=16, skip="noskip" not in words)
    c.objective.corruption = "masking" if "masking" in words else "gaussian"
    if "tiny" in words:
        make_tiny(c)
    return c
