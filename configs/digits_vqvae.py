"""python -m train --config configs/digits_vqvae.py --workdir runs/digits_vqvae

VQ-VAE on the 8x8 digits, then a class-conditional prior over its codes, both in one run
directory (checkpoints/vqvae, checkpoints/prior):
  stage vqvae: a convolutional encoder maps each digit to a 4x4 grid of 8-dim latents, each
    replaced by its nearest entry of a 64-code EMA codebook (straight-through gradient; the
    codebook is an exponential moving average, decay 0.99, of the encoder outputs assigned to
    each code, kept in the train state's model state); loss = MSE + 0.25 * commitment; a code no
    latent picked for 10 consecutive steps restarts at a random encoder output of the batch;
  stage prior: a small causal transformer reads [class token, c_0, ..., c_14] and predicts
    c_0 ... c_15 (raster order) by next-token cross-entropy.
``run.sample(n, labels=...)`` draws codes ancestrally at config.sampling.temperature and decodes
them; ``run.encode`` gives code indices [N, 4, 4], ``run.decode`` takes them back to images.
``python -m train.sample --workdir runs/digits_vqvae --num 100 --labels 7 --out seven.png``
``python -m train.eval --workdir runs/digits_vqvae``: reconstruction MSE, codebook usage and
perplexity, the prior's bits per code, the independent-classifier accuracy of class-conditional
samples (per temperature), PNG grids. Measurements: docs/VQVAE.md. Arguments: tiny (seconds, for
tests); grid2 (a 2x2 grid of 128 codes instead of 4x4 of 64); gradient (a gradient-trained
codebook, loss + codebook term, with a 0.1-weighted pull of every code unused in the batch towards
the encoding of its own fixed training position instead of restarts); anomaly (the VQ-VAE
trains without the digit 8: python -m train.anomaly scores it by reconstruction error).
"""
import ml_collections

from configs.common import base_config, data_options, make_tiny, parse_arg, with_stage_init_from


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "grid2", "gradient", "anomaly"))
    c = base_config()
    c.task = "vqvae"
    c.data = ml_collections.ConfigDict({"name": "digits", "train_split": "train", "eval_split": "test",
                                        "data_dir": "", "options": data_options()})
    grid2, gradient = "grid2" in words, "gradient" in words
    num_codes = 128 if grid2 else 64
    grid = 2 if grid2 else 4
    # stage 1 (the top-level model): the VQ-VAE; run.model is this module
    c.model_class = "jaxgen.nn.prior:ConvVQVAE"
    c.model = ml_collections.ConfigDict({
        "image_size": 8, "in_channels": 1, "channels": (32, 64) if grid2 else (64,), "act": "relu",
        "latent_dim": 0, "skip": False, "num_codes": num_codes, "code_dim": 8, "beta": 0.25,
        # "ema": EMA codebook in the model state, a code unused for dead_code_threshold steps restarts
        # at a random encoder output; "gradient": a codebook parameter trained by the codebook loss
        "codebook_type": "gradient" if gradient else "ema", "ema_decay": 0.99,
        "dead_code_threshold": 0 if gradient else 10})
    # the gradient codebook's revival: the weight of a pull of unused codes towards fixed encodings
    c.vq = ml_collections.ConfigDict({"dead_code_weight": 0.1 if gradient else 0.0})
    c.sampling = ml_collections.ConfigDict({"temperature": 1.0})
    c.eval = ml_collections.ConfigDict({"num_samples": 1000, "temperatures": (0.7, 1.0)})
    c.batch_size = 128
    c.total_steps = 1500
    c.checkpoint_every = 1000
    c.log_every = 100
    c.image_every = 1000
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.stages = ml_collections.ConfigDict({
        "vqvae": {"total_steps": 1500},
        "prior": {
            "total_steps": 2000,
            "model_class": "jaxgen.nn.prior:CodePrior",
            "model": {"num_codes": num_codes, "seq_len": grid * grid, "num_classes": 10, "width": 64,
                      "depth": 2, "num_heads": 4, "mlp_ratio": 4, "dropout": 0.1},
            "optim": {"lr": 1e-3, "weight_decay": 0.01},
            "ema": {"decay": 0.999},
        },
    })
    if "tiny" in words:
        make_tiny(c)
        for stage in c.stages.values():  # every stage: 2 steps of batch 16 (make_tiny set the rest)
            stage.total_steps = 2
        c.stages.prior.model.width = 32
        c.stages.prior.model.depth = 1
        c.stages.prior.optim.warmup_steps = 1
        c.eval.num_samples = 20
    if "anomaly" in words:  # the VQ-VAE stage trains without the digit 8 (python -m train.anomaly)
        c.data.exclude_labels = (8,)
    return with_stage_init_from(c)
