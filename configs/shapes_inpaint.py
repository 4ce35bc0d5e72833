"""python -m train --config configs/shapes_inpaint.py --workdir runs/shapes_inpaint

Inpainting with the skip-connected autoencoder on the 32x32 shapes: each training image gets one
random rectangular occluder (sides 6 to 12 px) filled with mid-grey, a value the pure-colour shapes
never take; the loss is the MSE on the hidden rectangle only, and the restored image keeps the
visible pixels. ``python -m train.eval --workdir runs/shapes_inpaint`` reports the hidden-region
MSE on the test split (fixed occluders) against filling the hole with a normalised Gaussian blur of
the visible pixels (best of sigma 1, 2, 4 px) and writes eval/inpainting.png (rows: image,
occluded, restored, blurred fill). Arguments: tiny (seconds, for tests).
"""
from configs.common import make_tiny, parse_arg, skip_autoencoder


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny",))
    c = skip_autoencoder("shapes", image_size=32, in_channels=3, channels=(16, 32, 64),
                         objective={"corruption": "occlude", "occluder_min": 6, "occluder_max": 12,
                                    "fill": 0.0})
    if "tiny" in words:
        make_tiny(c)
        c.model.channels = (8, 16)
    return c
