"""python -m train --config configs/paired_colorize.py --workdir runs/paired_colorize

Image-to-image from a paired folder: the skip-connected autoencoder maps each example's
``source`` image to its ``image`` (objective corruption "paired"; MSE over all pixels). The data
is an image folder with one subfolder per field (``data.options.fields``), by default the grey /
colour shapes pairs that ``python -m train.make_paired --out runs/paired_shapes`` writes: so this
is colorization learned from files. Point ``--config.data.name=folder:/your/pairs`` at any folder
of the same layout (DIR/{train,test}/{source,image}/*, same file names in both).
``python -m train.eval --workdir runs/paired_colorize`` reports the test MSE against the source
taken as output and the mean training image; eval/paired.png shows source, output, target.
Arguments: tiny (seconds, for tests).
"""
from configs.common import make_tiny, parse_arg, skip_autoencoder


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny",))
    c = skip_autoencoder("folder:runs/paired_shapes", image_size=32, in_channels=3, channels=(16, 32),
                         objective={"corruption": "paired"})
    c.data.options.fields = ("source", "image")
    c.total_steps = 1000
    if "tiny" in words:
        make_tiny(c)
        c.model.channels = (8, 16)
    return c
