"""python -m train --config configs/photos_colorize.py --workdir runs/photos_colorize

Colorization of photographs with the skip-connected autoencoder: random 32x32 patches of
scikit-learn's two sample photos (china.jpg, flower.jpg; the ``photos`` dataset: 4,096 training
patches, 512 test patches from a disjoint region of each photo). Input: the patch's luminance in
all three channels; target: its colours; MSE over all pixels.
``python -m train.eval --workdir runs/photos_colorize`` reports the colour MSE against the
training set's mean colour, the grey input taken as colour, and a luminance-to-colour lookup
table; writes eval/colorization.png (rows: grey input, colorized, truth).
Arguments: tiny (seconds, for tests).
"""
from configs.common import make_tiny, parse_arg, skip_autoencoder


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny",))
    c = skip_autoencoder("photos", image_size=32, in_channels=3, channels=(16, 32, 64),
                         objective={"corruption": "grey"})
    if "tiny" in words:
        make_tiny(c)
        c.model.channels = (8, 16)
    return c
