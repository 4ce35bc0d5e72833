"""The autoencoder family's tasks: plain / denoising / sparse autoencoders and the VAE.

Objectives (config.objective): corruption "none" | "gaussian" (sigma) | "masking" (rho) of the
input with the clean image as target (denoising); l1 > 0 adds an L1 penalty on the code (sparse).
config.data.exclude_labels drops digits from training (anomaly detection: they are scored by
reconstruction error at evaluation).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import corruption, losses
from jaxgen.data.pipeline import images_to_float, images_to_uint8
from jaxgen.eval import baselines
from jaxgen.eval.images import make_grid, save_png
from jaxgen.training.tasks.base import Task

EVAL_KEY = 1234  # fixed corruption noise at evaluation


def _upscale(images: np.ndarray) -> int:
    return 4 if images.shape[1] < 16 else 1


class AutoencoderTask(Task):
    """Trains ``model(x) -> (reconstruction, code)`` by mean squared error on images in [-1, 1]."""

    name = "autoencoder"

    @property
    def objective(self):
        return self.config.get("objective", {"corruption": "none", "sigma": 0.5, "rho": 0.3, "l1": 0.0})

    def batch_arrays(self, ds):
        arrays = super().batch_arrays(ds)
        exclude = tuple(self.config.data.get("exclude_labels", ()) or ())
        if exclude and "label" in arrays:
            keep = ~np.isin(arrays["label"], exclude)
            arrays = {k: v[keep] for k, v in arrays.items()}
        return arrays

    def corrupt(self, key, x):
        o = self.objective
        return corruption.corrupt(key, x, o["corruption"], sigma=o.get("sigma", 0.5), rho=o.get("rho", 0.3))

    def loss_fn(self, params, batch, key):
        x = images_to_float(batch["image"])  # uint8 [B, H, W, C] -> [-1, 1]
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        recon, code = self.model.apply({"params": params}, self.corrupt(key, x).astype(dtype))
        mse = losses.mse(recon, x)
        metrics = {"mse": mse}
        loss = mse
        l1 = self.objective.get("l1", 0.0)
        if l1:
            metrics["l1"] = losses.l1_sparsity(code)
            loss = loss + l1 * metrics["l1"]
        return loss, metrics

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
        return self._apply(params, images_to_float(self.check_images(images)), "encode")

    def decode(self, params, codes):
        """codes [N, latent_dim] -> uint8 [N, H, W, C]."""
        return images_to_uint8(self._apply(params, np.asarray(codes, np.float32), "decode"))

    def reconstruct(self, params, images):
        """uint8 [N, H, W, C] -> uint8 [N, H, W, C] (the full forward pass, skips included)."""
        return images_to_uint8(self._apply(params, images_to_float(self.check_images(images)), "reconstruct"))

    def denoise(self, params, x):
        """float [N, H, W, C] (corrupted, any range) -> float [N, H, W, C] in model space."""
        return self._apply(params, np.asarray(x, np.float32), "reconstruct")

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
        return make_grid(np.concatenate([images, recon]), ncol=len(images), upscale=_upscale(images))

    def evaluate(self, run, out_dir):
        train, test = self.load_data(self.config.data.train_split), self.load_data(self.config.data.eval_split)
        exclude = tuple(self.config.data.get("exclude_labels", ()) or ())
        normal = ~np.isin(test.labels, exclude) if (exclude and test.labels is not None) else np.ones(len(test), bool)
        recon = run.reconstruct(test.images)
        err = np.mean((recon.astype(np.float64) / 255 - test.images.astype(np.float64) / 255) ** 2, axis=(1, 2, 3))
        out = {"test_mse": float(err[normal].mean())}
        save_png(os.path.join(out_dir, "reconstructions.png"),
                 make_grid(np.concatenate([test.images[:16], recon[:16]]), ncol=16, upscale=_upscale(test.images)))
        if exclude:
            out["anomaly_digits"] = list(exclude)
            out["anomaly_auroc"] = baselines.auroc(err[normal], err[~normal])
            out["anomaly_mse"] = float(err[~normal].mean())
        latent = getattr(self.model, "latent_dim", 0)
        if latent and not getattr(self.model, "skip", False) and not exclude:
            ztr, zte = run.encode(train.images), run.encode(test.images)
            ptr, pte, pca_mse = baselines.pca_codes_and_mse(train.images, test.images, latent)
            out["pca_test_mse"] = pca_mse
            if train.labels is not None:
                out["knn5_accuracy"] = baselines.knn_accuracy(ztr, train.labels, zte, test.labels)
                out["pca_knn5_accuracy"] = baselines.knn_accuracy(ptr, train.labels, pte, test.labels)
                if latent == 2:
                    scatter_png(os.path.join(out_dir, "codes_scatter.png"), zte, pte, test.labels)
        if self.objective["corruption"] != "none":
            out.update(self.evaluate_denoising(run, test.images, out_dir))
        if self.objective.get("l1", 0.0):
            codes = np.abs(run.encode(test.images)).reshape(len(test), -1)
            out["code_l1"] = float(codes.sum(1).mean())
            out["code_fraction_near_zero"] = float((codes < 1e-2).mean())
        return out

    def evaluate_denoising(self, run, images: np.ndarray, out_dir: str, rounds: int = 5) -> dict:
        """Denoising MSE on [0, 1] pixels (test set, fixed noise) and an iterated-denoising strip."""
        x = images_to_float(images)
        noisy = np.asarray(self.corrupt(jax.random.key(EVAL_KEY), jnp.asarray(x)))
        den = self.denoise(run.params, noisy)
        to01 = lambda a: np.clip((np.asarray(a, np.float64) + 1) / 2, 0, 1)
        out = {"denoising_mse": float(np.mean((to01(den) - to01(x)) ** 2)),
               "noisy_input_mse": float(np.mean((to01(noisy) - to01(x)) ** 2))}
        rows, cur = [images[:8], images_to_uint8(np.clip(noisy[:8], -1, 1))], noisy[:8]
        for _ in range(rounds):  # feed the output back in, as the lecture asks
            cur = self.denoise(run.params, cur)
            rows.append(images_to_uint8(cur))
        save_png(os.path.join(out_dir, "iterated_denoising.png"),
                 make_grid(np.concatenate(rows), ncol=8, upscale=_upscale(images)))
        return out


class VAETask(AutoencoderTask):
    """VAE: −log p(x|z) (Bernoulli on [0, 1] pixels) + β·KL(q(z|x) || N(0, I)), reparameterised."""

    name = "vae"
    _METHODS = {"encode": lambda m, x: m.encode(x).mean, "decode": lambda m, z: m.decode(z),
                "reconstruct": lambda m, x: m.decode(m.encode(x).mean)}

    def loss_fn(self, params, batch, key):
        x = images_to_float(batch["image"])
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        logits, q = self.model.apply({"params": params}, x.astype(dtype), key)
        nll = losses.bernoulli_nll(logits, (x + 1) / 2)
        kl = losses.gaussian_kl_standard(q.mean.astype(jnp.float32), q.logvar.astype(jnp.float32))
        beta = self.config.objective.get("beta", 1.0)
        return nll + beta * kl, {"nll": nll, "kl": kl, "neg_elbo": nll + kl}

    def sample(self, params, num, seed=0, labels=None, prompts=None, num_steps=None,
               guidance_scale=None, scheduler=None):
        """``num`` images decoded from z ~ N(0, I): uint8 [num, H, W, C]."""
        if labels is not None or prompts is not None:
            raise ValueError("this VAE is unconditional: it takes no labels or prompts.")
        z = jax.random.normal(jax.random.key(seed), (num, self.model.latent_dim))
        return self.decode(params, np.asarray(z))

    def neg_elbo(self, params, images: np.ndarray, seed: int = 0) -> float:
        """Mean −ELBO in nats per image (one posterior sample per image)."""
        fn = self.__dict__.setdefault("_elbo_fn", jax.jit(
            lambda p, x, k: self.loss_fn(p, {"image": x}, k)[1]["neg_elbo"]))
        vals = [float(fn(params, images[i:i + 500], jax.random.key(seed + i))) * len(images[i:i + 500])
                for i in range(0, len(images), 500)]
        return sum(vals) / len(images)

    def evaluate(self, run, out_dir):
        from jaxgen.eval.classifier import PixelClassifier, confidence_and_entropy

        train, test = self.load_data(self.config.data.train_split), self.load_data(self.config.data.eval_split)
        recon = run.reconstruct(test.images)
        out = {"test_mse": float(np.mean((recon / 255.0 - test.images / 255.0) ** 2)),
               "test_neg_elbo_nats": self.neg_elbo(run.params, test.images)}
        clf = PixelClassifier(train.images, train.labels)
        out["classifier_test_accuracy"] = float(np.mean(clf.predict(test.images) == test.labels))
        samples = run.sample(1000, seed=0)
        conf, ent = confidence_and_entropy(clf.probs(samples))
        out.update(sample_confidence=conf, sample_class_entropy=ent)
        up = _upscale(test.images)
        save_png(os.path.join(out_dir, "samples.png"), make_grid(samples[:64], ncol=8, upscale=up))
        save_png(os.path.join(out_dir, "reconstructions.png"),
                 make_grid(np.concatenate([test.images[:16], recon[:16]]), ncol=16, upscale=up))
        # interpolations between posterior means of test pairs
        z = run.encode(test.images[:16])
        t = np.linspace(0, 1, 10)[None, :, None]
        path = (1 - t) * z[0::2, None] + t * z[1::2, None]  # [8 pairs, 10 steps, D]
        save_png(os.path.join(out_dir, "interpolations.png"),
                 make_grid(run.decode(path.reshape(-1, z.shape[1])), ncol=10, upscale=up))
        if self.model.latent_dim == 2:
            g = np.linspace(-2.5, 2.5, 16)
            grid = np.stack(np.meshgrid(g, -g), -1).reshape(-1, 2).astype(np.float32)
            save_png(os.path.join(out_dir, "latent_map.png"), make_grid(run.decode(grid), ncol=16, upscale=up))
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
