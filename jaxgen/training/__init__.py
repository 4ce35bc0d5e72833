"""Training: train state, optimizers, EMA, pure step builders, meshes, checkpoints, the Run."""
