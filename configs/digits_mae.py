"""python -m train --config configs/digits_mae.py --workdir runs/digits_mae

Masked autoencoder on the 8x8 digits: 2x2 patches (16 per image), 75% of them hidden per example
(the encoder sees 4), a ViT encoder (width 64, 4 layers, 4 heads) over the visible patches, a light
decoder (width 64, 2 layers) over visible tokens + mask tokens with fixed 2-D sin-cos positions;
MSE on the hidden patches only. ``python -m train.eval --workdir runs/digits_mae`` reports the
masked-patch error against filling with the mean training patch, a linear probe (logistic
regression) on the mean-pooled encoder features against one on raw pixels, and writes
eval/masked_reconstructions.png. Arguments: tiny (seconds, for tests), normpix (loss on
per-patch standardised pixels).
"""
from configs.common import make_tiny, mae_config, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "normpix"))
    c = mae_config("digits", image_size=8, channels=1, patch_size=2, probe_targets=("label",))
    c.objective.norm_pix_loss = "normpix" in words
    if "tiny" in words:
        make_tiny(c)
        c.model.update({"hidden_size": 32, "num_layers": 1, "decoder_hidden_size": 16, "decoder_num_layers": 1})
    return c
