"""The autoencoder family's task: reconstruction objective, previews, PCA comparisons."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data.pipeline import images_to_float, images_to_uint8
from jaxgen.eval import baselines
from jaxgen.eval.images import make_grid, save_png
from jaxgen.training.tasks.base import Task


class AutoencoderTask(Task):
    """Trains ``model(x) -> (reconstruction, code)`` by mean squared error on images in [-1, 1]."""

    name = "autoencoder"

    def loss_fn(self, params, batch, key):
        x = images_to_float(batch["image"])  # uint8 [B, H, W, C] -> [-1, 1]
        recon, code = self.model.apply({"params": params}, x.astype(jax.tree_util.tree_leaves(params)[0].dtype))
        mse = jnp.mean((recon.astype(jnp.float32) - x) ** 2)
        return mse, {"mse": mse}

    # -- Run abilities (uint8 NHWC at the dataset's resolution in and out) ------------------
    _METHODS = {"encode": lambda m, x: m.encode(x), "decode": lambda m, z: m.decode(z),
                "reconstruct": lambda m, x: m(x)[0]}

    def _apply(self, params, x, name: str, batch_size: int = 512):
        """Run method ``name`` jitted (compiled once per method and batch shape), in chunks."""
        fns = self.__dict__.setdefault("_jitted", {})
        if name not in fns:
            method = self._METHODS[name]
            fns[name] = jax.jit(lambda p, xb: self.model.apply({"params": p}, xb, method=method))
        return np.concatenate([np.asarray(fns[name](params, x[i:i + batch_size]))
                               for i in range(0, len(x), batch_size)])

    def encode(self, params, images):
        """uint8 [N, H, W, C] -> codes float32 [N, latent_dim]."""
        x = images_to_float(self.check_images(images))
        return self._apply(params, x, "encode")

    def decode(self, params, codes):
        """codes [N, latent_dim] -> uint8 [N, H, W, C]."""
        return images_to_uint8(self._apply(params, np.asarray(codes, np.float32), "decode"))

    def reconstruct(self, params, images):
        """uint8 [N, H, W, C] -> uint8 [N, H, W, C] (the full forward pass, skips included)."""
        x = images_to_float(self.check_images(images))
        recon = self._apply(params, x, "reconstruct")
        return images_to_uint8(recon)

    def sample_codes(self, run, num: int, seed: int = 0) -> np.ndarray:
        """Decode ``num`` codes drawn from a Gaussian fitted to the test set's codes: uint8 [num, H, W, C]."""
        codes = run.encode(self.load_data(self.config.data.eval_split).images)
        mean, std = codes.mean(0), codes.std(0)
        z = np.random.default_rng(seed).normal(size=(num, len(mean))) * std + mean
        return run.decode(z.astype(np.float32))

    # -- previews and evaluation ------------------------------------------------------------
    def preview(self, params, batch):
        images = np.asarray(jax.device_get(batch["image"]))[:16]
        recon = self.reconstruct(params, images)
        return make_grid(np.concatenate([images, recon]), ncol=len(images), upscale=4 if images.shape[1] < 16 else 1)

    def evaluate(self, run, out_dir):
        train, test = self.load_data(self.config.data.train_split), self.load_data(self.config.data.eval_split)
        recon = run.reconstruct(test.images)
        mse = float(np.mean((recon.astype(np.float64) / 255 - test.images.astype(np.float64) / 255) ** 2))
        out = {"test_mse": mse}
        save_png(os.path.join(out_dir, "reconstructions.png"),
                 make_grid(np.concatenate([test.images[:16], recon[:16]]), ncol=16,
                           upscale=4 if test.images.shape[1] < 16 else 1))
        latent = getattr(self.model, "latent_dim", 0)
        if latent and not getattr(self.model, "skip", False):
            ztr, zte = run.encode(train.images), run.encode(test.images)
            ptr, pte, pca_mse = baselines.pca_codes_and_mse(train.images, test.images, latent)
            out["pca_test_mse"] = pca_mse
            if train.labels is not None:
                out["knn5_accuracy"] = baselines.knn_accuracy(ztr, train.labels, zte, test.labels)
                out["pca_knn5_accuracy"] = baselines.knn_accuracy(ptr, train.labels, pte, test.labels)
                if latent == 2:
                    scatter_png(os.path.join(out_dir, "codes_scatter.png"), zte, pte, test.labels)
        return out


def scatter_png(path: str, codes: np.ndarray, pca_codes: np.ndarray, labels: np.ndarray) -> str:
    """Side-by-side scatter of 2-D autoencoder codes and 2-D PCA codes, coloured by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, z, title in ((axes[0], codes, "autoencoder codes"), (axes[1], pca_codes, "PCA (2 components)")):
        sc = ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=8, vmin=-0.5, vmax=9.5)
        ax.set_title(title)
    fig.colorbar(sc, ax=axes, ticks=range(10), label="digit")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

