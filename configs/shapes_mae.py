"""python -m train --config configs/shapes_mae.py --workdir runs/shapes_mae

Masked autoencoder on the 32x32 shapes: 4x4 patches (64 per image), 75% hidden per example (the
encoder sees 16), ViT encoder width 64 x 3 layers, decoder width 32 x 2 layers, fixed 2-D sin-cos
positions, MSE on the hidden patches; 4,000 steps of batch 64 (the decoder runs over all 64
tokens, so it is kept narrower than digits_mae's to fit the 10-minute CPU budget). ``python -m train.eval --workdir runs/shapes_mae``: the
masked-patch error against the mean-patch fill, linear probes of shape, colour, size and position
on the encoder's mean-pooled features against raw pixels, eval/masked_reconstructions.png.
Arguments: tiny (seconds, for tests), normpix (loss on per-patch standardised pixels).
"""
from configs.common import make_tiny, mae_config, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "normpix"))
    c = mae_config("shapes", image_size=32, channels=3, patch_size=4,
                   probe_targets=("shape", "color", "size", "position"))
    c.model.update({"num_layers": 3, "decoder_hidden_size": 32})
    c.batch_size = 64
    c.objective.norm_pix_loss = "normpix" in words
    if "tiny" in words:
        make_tiny(c)
        c.model.update({"hidden_size": 32, "num_layers": 1, "decoder_hidden_size": 16, "decoder_num_layers": 1})
    return c
