"""python -m train --config configs/digits_sparse_ae.py --workdir runs/digits_sparse_ae

Sparse autoencoder on the 8x8 digits: an over-complete 64-unit code with an L1 penalty
(objective.l1) on the code activations. ``python -m train.eval`` reports the reconstruction MSE,
the code's mean L1 norm and the fraction of code units near zero. Arguments: tiny, dense.
"""
from configs.common import digits_autoencoder, make_tiny, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "dense"))
    c = digits_autoencoder(latent_dim=64, dense="dense" in words)
    c.objective.l1 = 1e-3
    if "tiny" in words:
        make_tiny(c)
    return c
