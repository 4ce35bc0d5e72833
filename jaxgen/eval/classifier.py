"""An independent classifier for generated digits (scikit-learn SVC on the real images), and the
statistics computed from it: accuracy, confidence, class-histogram entropy, Fréchet distance."""
from __future__ import annotations

import numpy as np

from jaxgen.eval.baselines import flatten01


class PixelClassifier:
    """SVC (RBF kernel, Platt probabilities) on flattened [0, 1] pixels of uint8 NHWC images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, C: float = 10.0, seed: int = 0):
        from sklearn.svm import SVC

        self.svc = SVC(C=C, gamma="scale", probability=True, random_state=seed)
        self.svc.fit(flatten01(images), np.asarray(labels))
        self.classes = self.svc.classes_

    def probs(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> class probabilities float64 [N, K]."""
        return self.svc.predict_proba(flatten01(images))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.classes[np.argmax(self.probs(images), axis=1)]

    def features(self, images: np.ndarray) -> np.ndarray:
        """The classifier's feature space for Fréchet distances: one-vs-rest decision values [N, K]."""
        return self.svc.decision_function(flatten01(images))


def confidence_and_entropy(probs: np.ndarray) -> tuple[float, float]:
    """(mean max-probability, entropy of the predicted-class histogram / log K)."""
    k = probs.shape[1]
    hist = np.bincount(np.argmax(probs, axis=1), minlength=k) / len(probs)
    nz = hist[hist > 0]
    return float(np.mean(np.max(probs, axis=1))), float(-(nz * np.log(nz)).sum() / np.log(k))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(len(s1))
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
