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
