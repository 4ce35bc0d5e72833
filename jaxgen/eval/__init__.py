"""Evaluation: image grids, classical baselines (PCA), classifier metrics, Fréchet distance."""
