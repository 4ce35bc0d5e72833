"""Anomaly detection by reconstruction error, for any run that has ``run.reconstruct``
(autoencoder, VAE, VQ-VAE, ...): images a model was not trained on reconstruct worse."""
from __future__ import annotations

import numpy as np

from jaxgen.errors import DataError
from jaxgen.eval.baselines import auroc


def per_image_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean squared difference of two uint8 image batches [N, H, W, C] on [0, 1] pixels: float64 [N]."""
    diff = np.asarray(a, np.float64) / 255.0 - np.asarray(b, np.float64) / 255.0
    return np.mean(diff.reshape(len(diff), -1) ** 2, axis=1)


def reconstruction_errors(run, images: np.ndarray) -> np.ndarray:
    """Per-image mean squared error of ``run.reconstruct`` on [0, 1] pixels: float64 [N]."""
    return per_image_mse(run.reconstruct(images), images)


def anomaly_report(errors: np.ndarray, labels: np.ndarray, anomalous) -> dict:
    """AUROC of 'higher error = anomalous' with the classes ``anomalous`` as positives.

    errors: float [N] per-image scores; labels: int [N]. Returns {"anomaly_digits", "anomaly_auroc",
    "normal_mse", "anomaly_mse", "num_normal", "num_anomalous"}.
    """
    anomalous = sorted(int(k) for k in anomalous)
    is_anomaly = np.isin(np.asarray(labels), anomalous)
    if not anomalous or is_anomaly.all() or not is_anomaly.any():
        raise DataError(f"anomaly detection needs normal and anomalous test images; labels {anomalous} "
                        f"mark {int(is_anomaly.sum())} of {len(labels)} as anomalous. Train with "
                        "data.exclude_labels set (e.g. the config word ':anomaly').")
    return {"anomaly_digits": anomalous,
            "anomaly_auroc": auroc(errors[~is_anomaly], errors[is_anomaly]),
            "normal_mse": float(errors[~is_anomaly].mean()),
            "anomaly_mse": float(errors[is_anomaly].mean()),
            "num_normal": int((~is_anomaly).sum()), "num_anomalous": int(is_anomaly.sum())}


def compare_runs(runs: dict, out_dir: str) -> dict:
    """Anomaly detection of several runs side by side on their common test split.

    runs: {name: Run}, each trained with the same data.exclude_labels (the anomalous classes).
    Writes out_dir/anomaly.json (the table), anomaly_roc.png (ROC curves and error histograms)
    and anomaly_reconstructions.png (8 normal then 8 anomalous test images, one row per run
    under the inputs). Returns the table {name: {task, step, anomaly_auroc, normal_mse, ...}}.
    """
    import json
    import os

    from sklearn.metrics import roc_curve

    from jaxgen.eval.images import make_grid, save_png

    if not runs:
        raise DataError("compare_runs needs at least one run.")
    excluded = {name: tuple(sorted(run.config.data.get("exclude_labels", ()) or ())) for name, run in runs.items()}
    if len(set(excluded.values())) != 1 or not next(iter(excluded.values())):
        raise DataError(f"the runs must all be trained without the same labels; data.exclude_labels are "
                        f"{excluded}. Train each with its config's ':anomaly' word.")
    anomalous = next(iter(excluded.values()))
    first = next(iter(runs.values()))
    test = first.task.load_data(first.config.data.eval_split)
    is_anomaly = np.isin(test.labels, anomalous)
    table, curves, recons = {}, {}, {}
    for name, run in runs.items():
        recon = run.reconstruct(test.images)
        errors = per_image_mse(recon, test.images)
        table[name] = {"task": run.task.name, "workdir": run.workdir, "step": run.step,
                       **anomaly_report(errors, test.labels, anomalous)}
        curves[name] = (roc_curve(is_anomaly, errors)[:2], errors)
        recons[name] = recon
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "anomaly.json"), "w") as f:
        json.dump(table, f, indent=2)
    _roc_png(os.path.join(out_dir, "anomaly_roc.png"), curves, table, is_anomaly, anomalous)
    pick = np.concatenate([np.nonzero(~is_anomaly)[0][:8], np.nonzero(is_anomaly)[0][:8]])
    rows = [test.images[pick]] + [recons[name][pick] for name in runs]
    up = 4 if test.images.shape[1] < 16 else 1
    save_png(os.path.join(out_dir, "anomaly_reconstructions.png"),
             make_grid(np.concatenate(rows), ncol=len(pick), upscale=up))
    return table


def _roc_png(path: str, curves: dict, table: dict, is_anomaly: np.ndarray, anomalous) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.5 * (n + 1), 4))
    for name, ((fpr, tpr), errors) in curves.items():
        axes[0].plot(fpr, tpr, label=f"{name} (AUROC {table[name]['anomaly_auroc']:.3f})")
    axes[0].plot([0, 1], [0, 1], "k:", lw=1)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate",
                title=f"ROC: digit(s) {list(anomalous)} as anomalies")
    axes[0].legend(loc="lower right", fontsize=8)
    for ax, (name, (_, errors)) in zip(axes[1:], curves.items()):
        bins = np.linspace(0, np.quantile(errors, 0.995), 40)
        ax.hist(errors[~is_anomaly], bins, alpha=0.6, density=True, label="normal")
        ax.hist(errors[is_anomaly], bins, alpha=0.6, density=True, label="anomalous")
        ax.set(title=name, xlabel="reconstruction MSE per image")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
