"""The autoencoder family's tasks: plain / denoising / sparse autoencoders and the VAE.

Objectives (config.objective): corruption "none" | "gaussian" (sigma) | "masking" (rho) of the
input with the clean image as target (denoising); l1 > 0 adds an L1 penalty on the code (sparse).
Two applications change what the input is and where the loss is taken:
  "occlude" (inpainting): one random rectangle per image (sides in [occluder_min, occluder_max]
      px) is replaced by ``fill``; the loss is the MSE on the hidden rectangle only, and the
      restored image keeps the visible pixels (``inpaint``);
  "grey" (colorization): the input is the image's luminance (BT.601) in all three channels, the
      target the colour image; MSE over all pixels (``colorize``).
And one takes its input from the data: "paired": each example's ``source`` image (a paired
dataset: ``data.options.fields=("source", "image")`` on an image folder) is the input, its
``image`` the target; MSE over all pixels (``translate``).
Run abilities: encode, decode, reconstruct, denoise, inpaint, colorize, translate, decode_random_codes
(the VAE adds sample).
config.data.exclude_labels drops digits from training (anomaly detection: they are scored by
reconstruction error at evaluation, jaxgen.eval.anomaly).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import corruption, losses
from jaxgen.data.chunks import map_chunked
from jaxgen.data.fields import Input
from jaxgen.data.pipeline import images_to_float, images_to_uint8
from jaxgen.errors import ConfigError, DataError
from jaxgen.eval import baselines
from jaxgen.eval.anomaly import anomaly_report, per_image_mse
from jaxgen.eval.images import make_grid, preview_upscale, save_png, spread_indices
from jaxgen.training.tasks.base import Task

EVAL_KEY = 1234  # fixed corruption noise at evaluation


def _upscale(images: np.ndarray) -> int:
    """Preview enlargement for a batch of images [N, H, W, C]."""
    return preview_upscale(images.shape[1])


class AutoencoderTask(Task):
    """Trains ``model(x) -> (reconstruction, code)`` by mean squared error on images in [-1, 1]."""

    name = "autoencoder"
    abilities = ("encode", "decode", "reconstruct", "denoise", "inpaint", "colorize", "translate",
                 "decode_random_codes")

    @property
    def paired(self) -> bool:
        """objective.corruption == "paired": the input is each example's own ``source`` image (a
        paired dataset, e.g. a grey photo beside its colour original), the target its ``image``."""
        return self.objective["corruption"] == "paired"

    def inputs(self):
        """The default image (+ optional label), and with the paired objective the ``source``
        image of the same shape."""
        fields = super().inputs()
        if self.paired:
            fields["source"] = Input("image", fields["image"].shape,
                                     doc="the model's input, paired with the target 'image'")
        return fields

    @property
    def objective(self):
        return self.config.get("objective", {"corruption": "none", "sigma": 0.5, "rho": 0.3, "l1": 0.0})

    def corrupt(self, key, x):
        o = self.objective
        return corruption.corrupt(key, x, o["corruption"], sigma=o.get("sigma", 0.5), rho=o.get("rho", 0.3))

    def occlude(self, key, x):
        """x [B, H, W, C] in [-1, 1] -> (occluded x, hole [B, H, W, 1]) with the objective's sizes."""
        o = self.objective
        lo, hi, size = int(o.get("occluder_min", 0)), int(o.get("occluder_max", 0)), self.model.image_size
        if not 1 <= lo <= hi <= size:
            raise ConfigError(f"objective.occluder_min={lo} / occluder_max={hi}: need 1 <= min <= max <= "
                              f"image_size={size}.")
        return corruption.occlude(key, x, lo, hi, float(o.get("fill", 0.0)))

    def model_input(self, key, x):
        """(input, loss region or None) of the objective for clean images x in [-1, 1]."""
        kind = self.objective["corruption"]
        if kind == "occlude":
            return self.occlude(key, x)
        if kind == "grey":
            return corruption.to_grey(x), None
        return self.corrupt(key, x), None

    def loss_fn(self, params, batch, key):
        x = images_to_float(batch["image"])  # uint8 [B, H, W, C] -> [-1, 1]
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        if self.paired:
            xin, region = images_to_float(batch["source"]), None
        else:
            xin, region = self.model_input(key, x)
        recon, code = self.model.apply({"params": params}, xin.astype(dtype))
        mse = losses.mse(recon, x) if region is None else losses.masked_mse(recon, x, region)
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
        return map_chunked(lambda xb: fns[name](params, xb), [x], batch_size)

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

    def inpaint(self, params, images, holes):
        """Restore hidden rectangles: uint8 [N, H, W, C] and holes [N, H, W, 1] (1 = hidden) ->
        uint8 [N, H, W, C], the visible pixels kept and the holes filled by the model."""
        x = images_to_float(self.check_images(images))
        holes = np.asarray(holes, np.float32)
        fill = float(self.objective.get("fill", 0.0))
        out = self.denoise(params, np.where(holes > 0, fill, x))
        return images_to_uint8(np.where(holes > 0, out, x))

    def colorize(self, params, images):
        """uint8 RGB [N, H, W, 3] (only their luminance is used) -> uint8 RGB [N, H, W, 3]."""
        x = images_to_float(self.check_images(images))
        return images_to_uint8(self.denoise(params, np.asarray(corruption.to_grey(jnp.asarray(x)))))

    def translate(self, params, sources):
        """Paired runs: source images uint8 [N, H, W, C] -> the model's output uint8 [N, H, W, C]."""
        if not self.paired:
            raise DataError("translate() is for paired runs (objective.corruption='paired'); this run "
                            f"trains with corruption={self.objective['corruption']!r}: use reconstruct().")
        x = images_to_float(self.check_field("source", sources))
        return images_to_uint8(self._apply(params, x, "reconstruct"))

    def decode_random_codes(self, params, num: int, seed: int = 0) -> np.ndarray:
        """Decode ``num`` codes drawn from a Gaussian fitted to the test set's codes: uint8 [num, H, W, C]."""
        from jaxgen.training.config_values import check_count

        check_count("num", num)
        if not getattr(self.model, "latent_dim", 0):
            raise DataError(f"this {self.name!r} run has no dense code (latent_dim 0) to sample from.")
        codes = self.encode(params, self.load_data(self.config.data.eval_split).images)
        mean, std = codes.mean(0), codes.std(0)
        z = np.random.default_rng(seed).normal(size=(num, len(mean))) * std + mean
        return self.decode(params, z.astype(np.float32))

    # -- previews and evaluation ------------------------------------------------------------
    def preview(self, params, batch):
        """Images over their reconstructions (inpainting: restorations; colorization: colorized)."""
        images = np.asarray(jax.device_get(batch["image"]))[:16]
        kind = self.objective["corruption"]
        if kind == "paired":
            images = np.asarray(jax.device_get(batch["source"]))[:16]
            return make_grid(np.concatenate([images, self.translate(params, images),
                                             np.asarray(jax.device_get(batch["image"]))[:16]]),
                             ncol=len(images), upscale=preview_upscale(images.shape[1]))
        if kind == "occlude":
            _, holes = self.occlude(jax.random.key(EVAL_KEY), jnp.asarray(images_to_float(images)))
            out = self.inpaint(params, images, np.asarray(holes))
        elif kind == "grey":
            out = self.colorize(params, images)
        else:
            out = self.reconstruct(params, images)
        return make_grid(np.concatenate([images, out]), ncol=len(images), upscale=_upscale(images))

    def evaluate(self, run, out_dir):
        kind = self.objective["corruption"]
        if kind == "occlude":
            return self.evaluate_inpainting(run, out_dir)
        if kind == "grey":
            return self.evaluate_colorization(run, out_dir)
        if kind == "paired":
            return self.evaluate_paired(run, out_dir)
        train, test = self.load_data(self.config.data.train_split), self.load_data(self.config.data.eval_split)
        exclude = tuple(self.config.data.get("exclude_labels", ()) or ())
        normal = ~np.isin(test.labels, exclude) if (exclude and test.labels is not None) else np.ones(len(test), bool)
        recon = run.reconstruct(test.images)
        err = per_image_mse(recon, test.images)
        out = {"test_mse": float(err[normal].mean())}
        save_png(os.path.join(out_dir, "reconstructions.png"),
                 make_grid(np.concatenate([test.images[:16], recon[:16]]), ncol=16, upscale=_upscale(test.images)))
        if exclude:
            out.update(anomaly_report(err, test.labels, exclude))
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
        if kind != "none":
            out.update(self.evaluate_denoising(run, test.images, out_dir))
        if self.objective.get("l1", 0.0):
            codes = np.abs(run.encode(test.images)).reshape(len(test), -1)
            out["code_l1"] = float(codes.sum(1).mean())
            out["code_fraction_near_zero"] = float((codes < 1e-2).mean())
        return out

    def evaluate_paired(self, run, out_dir) -> dict:
        """Paired runs: MSE on [0, 1] pixels between the output for each test source and its
        target image, against two references: the source itself taken as the output, and the
        training set's mean image; a PNG (rows: source, output, target)."""
        train, test = self.load_data(self.config.data.train_split), self.load_data(self.config.data.eval_split)
        src, tgt = self.gather(test)["source"], self.gather(test)["image"]
        pred = run.translate(src)
        f01 = lambda a: np.asarray(a, np.float64) / 255.0
        err = lambda a: float(np.mean((f01(a) - f01(tgt)) ** 2))
        out = {"test_mse": err(pred), "source_as_output_mse": err(src),
               "mean_image_mse": err(np.broadcast_to(train.images.mean(0), tgt.shape))}
        out["target_beats_source_met"] = bool(out["test_mse"] < out["source_as_output_mse"])
        pick = spread_indices(len(src))
        save_png(os.path.join(out_dir, "paired.png"),
                 make_grid(np.concatenate([src[pick], pred[pick], tgt[pick]]), ncol=len(pick),
                           upscale=preview_upscale(src.shape[1])))
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


    def evaluate_inpainting(self, run, out_dir, sigmas=(1.0, 2.0, 4.0)) -> dict:
        """Hidden-region MSE on [0, 1] pixels of the test split (one fixed rectangle per image)
        against filling the hole by a normalised Gaussian blur of the visible pixels (the best of
        ``sigmas``) and by the fill value itself; a PNG of examples."""
        test = self.load_data(self.config.data.eval_split)
        x = images_to_float(test.images)
        _, holes = self.occlude(jax.random.key(EVAL_KEY), jnp.asarray(x))
        holes = np.asarray(holes)
        restored = self.inpaint(run.params, test.images, holes)
        to01 = lambda a: (np.asarray(a, np.float64) + 1.0) / 2.0
        truth = to01(x)
        hole_mse = lambda img01: float(np.sum((img01 - truth) ** 2 * holes) / (holes.sum() * truth.shape[-1]))
        out = {"hole_mse": hole_mse(restored / 255.0),
               "hole_fraction": float(holes.mean()),
               "fill_value_mse": hole_mse(np.broadcast_to(to01(self.objective.get("fill", 0.0)), truth.shape))}
        blur = {s: baselines.blurred_fill(truth, holes, s) for s in sigmas}
        errs = {s: hole_mse(b) for s, b in blur.items()}
        best = min(errs, key=errs.get)
        out.update({f"blurred_fill_mse_sigma{s:g}": e for s, e in errs.items()})
        out.update(blurred_fill_mse=errs[best], blurred_fill_sigma=best,
                   ratio_to_blurred_fill=out["hole_mse"] / errs[best],
                   target_beats_blurred_fill_met=bool(out["hole_mse"] < errs[best]))
        pick = spread_indices(len(x))
        occluded = images_to_uint8(np.where(holes > 0, self.objective.get("fill", 0.0), x))
        rows = [test.images[pick], occluded[pick], restored[pick], np.round(blur[best][pick] * 255).astype(np.uint8)]
        save_png(os.path.join(out_dir, "inpainting.png"),
                 make_grid(np.concatenate(rows), ncol=16, upscale=2 * _upscale(test.images)))
        return out

    def evaluate_colorization(self, run, out_dir, lut_bins: int = 64) -> dict:
        """Colour MSE on [0, 1] RGB of the test split, against three references: the training
        set's mean colour (one RGB value for every pixel), the grey input taken as a colour image,
        and a luminance lookup table (the mean training colour of each of ``lut_bins`` luminance
        bins, pixel by pixel: the best any context-free colorizer can do); a side-by-side PNG."""
        train, test = self.load_data(self.config.data.train_split), self.load_data(self.config.data.eval_split)
        if test.images.shape[-1] != 3:
            raise ConfigError("colorization (objective.corruption='grey') needs an RGB dataset.")
        pred = self.colorize(run.params, test.images)
        f01 = lambda a: np.asarray(a, np.float64) / 255.0
        truth = f01(test.images)
        err = lambda img01: float(np.mean((img01 - truth) ** 2))
        luma = lambda img01: np.clip(img01 @ np.asarray(corruption.LUMA), 0.0, 1.0)       # [N, H, W]
        tr = f01(train.images)
        bins_tr = np.minimum((luma(tr) * lut_bins).astype(int), lut_bins - 1).reshape(-1)
        counts = np.bincount(bins_tr, minlength=lut_bins)[:, None]
        sums = np.stack([np.bincount(bins_tr, tr[..., c].reshape(-1), lut_bins) for c in range(3)], 1)
        lut = np.where(counts > 0, sums / np.maximum(counts, 1), tr.reshape(-1, 3).mean(0))  # [bins, 3]
        bins_te = np.minimum((luma(truth) * lut_bins).astype(int), lut_bins - 1)
        grey = np.repeat(luma(truth)[..., None], 3, axis=-1)
        out = {"colour_mse": err(f01(pred)),
               "mean_colour_mse": err(np.broadcast_to(tr.reshape(-1, 3).mean(0), truth.shape)),
               "grey_input_mse": err(grey),
               "luminance_lut_mse": err(lut[bins_te])}
        out["ratio_to_mean_colour"] = out["colour_mse"] / out["mean_colour_mse"]
        out["target_beats_mean_colour_met"] = bool(out["colour_mse"] < out["mean_colour_mse"])
        pick = spread_indices(len(truth))
        rows = [np.round(grey[pick] * 255).astype(np.uint8), pred[pick], test.images[pick]]
        save_png(os.path.join(out_dir, "colorization.png"),
                 make_grid(np.concatenate(rows), ncol=16, upscale=2 * _upscale(test.images)))
        return out


class VAETask(AutoencoderTask):
    """VAE: −log p(x|z) (Bernoulli on [0, 1] pixels) + β·KL(q(z|x) || N(0, I)), reparameterised."""

    name = "vae"
    abilities = AutoencoderTask.abilities + ("sample",)
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
        """``num`` images decoded from z ~ N(0, I): uint8 [num, H, W, C]. The VAE has no labels,
        prompts or sampling schedule: passing any is a DataError naming them."""
        given = [name for name, v in (("labels", labels), ("prompts", prompts), ("num_steps", num_steps),
                                      ("guidance_scale", guidance_scale), ("scheduler", scheduler)) if v is not None]
        if given:
            raise DataError(f"this VAE samples z ~ N(0, I) and decodes it: {', '.join(given)} do not apply to it "
                            "(it is unconditional and has no sampling steps).")
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
        exclude = tuple(self.config.data.get("exclude_labels", ()) or ())
        if exclude:
            out.update(anomaly_report(per_image_mse(recon, test.images), test.labels, exclude))
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
