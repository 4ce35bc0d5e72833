"""Random PyTorch weights for parity checks and benchmarks (imports torch when called).

Parity tests compare jaxgen with the diffusers / transformers classes on randomised weights, so
that no zero- or one-initialised layer (diffusers zero-initialises some output convolutions)
hides a conversion mistake.
"""
from __future__ import annotations

import numpy as np


def randomize_torch(model, seed: int = 0, scales: dict[str, float] | None = None):
    """Overwrite every parameter of the torch module ``model`` in place and return it in eval mode:
    matrices and kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.3²), other vectors
    ~ N(0, 0.5²); ``scales`` maps a parameter name to its own standard deviation (e.g. Fourier
    frequencies {"time_proj.weight": 4.0}). Deterministic in ``seed``."""
    import torch

    scales = scales or {}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name in scales:
                p.copy_(scales[name] * noise)
            elif p.ndim >= 2:
                p.copy_(noise / int(np.prod(p.shape[1:])) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.5 * noise)
    return model.eval()
