"""python -m train --config configs/shapes_colorize.py --workdir runs/shapes_colorize

Colorization with the skip-connected autoencoder on the 32x32 shapes: the input is the image's
luminance (BT.601) in all three channels, the target the colour image, MSE over all pixels.
``python -m train.eval --workdir runs/shapes_colorize`` reports the colour MSE on the test split
against the training set's mean colour, the grey input taken as colour, and a luminance-to-colour
lookup table; writes eval/colorization.png (rows: grey input, colorized, truth).
Arguments: tiny (seconds, for tests).
"""
from configs.common import make_tiny, parse_arg, skip_autoencoder


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny",))
    c = skip_autoencoder("shapes", image_size=32, in_channels=3, channels=(16, 32),
                         objective={"corruption": "grey"})
    c.total_steps = 1000
    if "tiny" in words:
        make_tiny(c)
        c.model.channels = (8, 16)
    return c
