"""Classical baselines and simple metrics (scikit-learn): PCA, k-NN accuracy, AUROC."""
from __future__ import annotations

import numpy as np


def flatten01(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float64 [N, H*W*C] in [0, 1]."""
    return np.asarray(images, np.float64).reshape(len(images), -1) / 255.0


def pca_codes_and_mse(train: np.ndarray, test: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """PCA with ``dim`` components fitted on train pixels ([0, 1]).

    Returns (train codes [N, dim], test codes [M, dim], test reconstruction MSE per pixel).
    """
    from sklearn.decomposition import PCA

    xtr, xte = flatten01(train), flatten01(test)
    pca = PCA(n_components=dim, random_state=0).fit(xtr)
    zte = pca.transform(xte)
    mse = float(np.mean((pca.inverse_transform(zte) - xte) ** 2))
    return pca.transform(xtr), zte, mse


def knn_accuracy(train_codes, train_labels, test_codes, test_labels, k: int = 5) -> float:
    """Accuracy of a k-nearest-neighbour classifier on codes (features standardised on train)."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_codes)
    clf = KNeighborsClassifier(n_neighbors=k).fit(scaler.transform(train_codes), train_labels)
    return float(clf.score(scaler.transform(test_codes), test_labels))


def auroc(scores_normal: np.ndarray, scores_anomalous: np.ndarray) -> float:
    """Area under the ROC curve for 'higher score = anomalous'."""
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.zeros(len(scores_normal)), np.ones(len(scores_anomalous))])
    return float(roc_auc_score(y, np.concatenate([scores_normal, scores_anomalous])))


def linear_probe_accuracy(train_x, train_y, test_x, test_y, max_iter: int = 2000) -> float:
    """Test accuracy of a multinomial logistic regression (L2, C=1) on standardised features.

    train_x: [N, D] features (or flattened pixels), train_y: int [N]; test_x, test_y likewise.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=max_iter).fit(scaler.transform(train_x), train_y)
    return float(clf.score(scaler.transform(test_x), test_y))


def blurred_fill(images: np.ndarray, holes: np.ndarray, sigma: float) -> np.ndarray:
    """Fill holes by a normalised Gaussian blur of the visible pixels (normalised convolution).

    images: float [N, H, W, C]; holes: [N, H, W, 1] (1 = hidden). Each hidden pixel becomes
    G*(x·v) / G*v with v = 1 - holes and G a Gaussian of std ``sigma`` px over (H, W) (zero
    outside the image); visible pixels are kept. Where G*v underflows (a hole far wider than
    sigma) the mean visible value of that image is used. A constant image is returned unchanged.
    """
    from scipy.ndimage import gaussian_filter

    x = np.asarray(images, np.float64)
    v = 1.0 - np.asarray(holes, np.float64)
    s = (0, sigma, sigma, 0)
    num = gaussian_filter(x * v, s, mode="constant")
    den = gaussian_filter(np.broadcast_to(v, x.shape), s, mode="constant")
    visible_mean = (x * v).sum((1, 2), keepdims=True) / np.maximum(v.sum((1, 2), keepdims=True), 1.0)
    fill = np.where(den > 1e-8, num / np.maximum(den, 1e-8), visible_mean)
    return np.where(v > 0, x, fill)
