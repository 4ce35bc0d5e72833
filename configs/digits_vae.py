"""python -m train --config configs/digits_vae.py --workdir runs/digits_vae

Variational autoencoder on the 8x8 digits: the encoder gives a mean and a log-variance,
z = mu + sigma * eps, loss = -log p(x|z) (Bernoulli pixels) + beta * KL(q(z|x) || N(0, I)).
``python -m train.eval`` reports the ELBO, and the confidence and class-histogram entropy of an
independent SVC classifier on 1,000 samples; writes samples, interpolations and (latent 2) a
latent map. Arguments: tiny, latent2 (a 2-D latent with its map), anomaly (trains without the
digit 8; eval reports the AUROC of its reconstruction error, see python -m train.anomaly).
"""
from configs.common import digits_autoencoder, make_tiny, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "latent2", "anomaly"))
    c = digits_autoencoder(latent_dim=2 if "latent2" in words else 8)
    c.task = "vae"
    c.model_class = "jaxgen.nn.autoencoder:ConvVAE"
    c.objective.beta = 1.0
    if "anomaly" in words:
        c.data.exclude_labels = (8,)
    if "tiny" in words:
        make_tiny(c)
    return c
