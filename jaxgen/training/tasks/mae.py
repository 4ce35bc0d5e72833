"""The masked autoencoder's task (config.task = "mae"; model ``jaxgen.nn.mae:MaskedAutoencoder``).

Training: a fresh random mask per example and step (the step key), loss on the hidden patches
only (``jaxgen.losses.masked_patch_loss``; ``objective.norm_pix_loss`` standardises each target
patch by its own mean and variance).

Run abilities (uint8 NHWC at the dataset's resolution in and out):
    run.encode(images)      -> float32 [N, D], mean of the encoder's tokens over all patches (no masking)
    run.reconstruct(images) -> uint8 images: visible patches kept, hidden ones predicted, under a
                               fixed mask (``EVAL_SEED``; the config's mask_ratio)

``python -m train.eval`` (``evaluate``):
    masked_patch_mse       error on the hidden patches of the test split (fixed masks, eval.mask_draws
                           draws per image), per pixel value in [0, 1]
    mean_patch_fill_mse    the same error when each hidden patch is filled with the mean training
                           patch at that position (the baseline; target: masked_patch_mse < 0.5x it)
    with norm_pix_loss both are measured on standardised patches instead ("error_space" says which)
    probe_<target>_mae / probe_<target>_pixels   test accuracy of a logistic regression on the
                           encoder's mean-pooled features vs on raw pixels (digits: the label;
                           shapes: the attributes in eval.probe_targets)
    masked_reconstructions.png   rows of 16: image, masked input (hidden patches grey), reconstruction
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import losses
from jaxgen.data.chunks import map_chunked
from jaxgen.data.pipeline import images_to_float, images_to_uint8
from jaxgen.errors import ConfigError
from jaxgen.eval.images import make_grid, preview_upscale, save_png, spread_indices
from jaxgen.nn.mae import patchify, unpatchify
from jaxgen.training.tasks.base import Task

EVAL_SEED = 1234   # masks of evaluation and run.reconstruct
CHUNK = 512        # images per jitted call


class MAETask(Task):
    """Masked autoencoder: loss on the hidden patches, evaluation against the mean-patch fill."""

    name = "mae"
    abilities = ("encode", "reconstruct")

    def __init__(self, config):
        super().__init__(config)
        if not hasattr(self.model, "patch_size") or not hasattr(self.model, "mask_ratio"):
            raise ConfigError(f"model_class={config.model_class!r} is not a masked autoencoder; the mae "
                              "task trains jaxgen.nn.mae:MaskedAutoencoder.")
        self.norm_pix = bool(config.objective.get("norm_pix_loss", False))
        self._fns: dict = {}

    def init_params(self, key, batch):
        x = images_to_float(batch["image"][:1])
        return self.model.init(key, x, key)["params"]

    def loss_fn(self, params, batch, key):
        x = images_to_float(batch["image"])  # uint8 [B, H, W, C] -> [-1, 1]
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        pred, mask = self.model.apply({"params": params}, x.astype(dtype), key)
        patches = patchify(x, self.model.patch_size)  # [B, N, P]
        loss = losses.masked_patch_loss(pred, patches, mask, self.norm_pix)
        visible = losses.masked_patch_loss(pred, patches, 1.0 - mask, self.norm_pix)
        return loss, {"masked_loss": loss, "visible_loss": visible}

    # -- jitted pieces -----------------------------------------------------------------------
    def _fn(self, name: str):
        if name not in self._fns:
            m = self.model
            if name == "features":
                self._fns[name] = jax.jit(lambda p, x: m.apply({"params": p}, x, method="features"))
            else:  # "masked": (pred, mask) under the mask drawn from key
                self._fns[name] = jax.jit(lambda p, x, k: m.apply({"params": p}, x, k))
        return self._fns[name]

    def predict_masked(self, params, images: np.ndarray, seed: int = EVAL_SEED):
        """Predictions under fixed masks: uint8 [N, H, W, C] -> (pred float32 [N, L, P] in the
        training target space, mask float32 [N, L], 1 = hidden). Chunk i uses fold_in(key(seed), i)."""
        x = images_to_float(self.check_images(images))
        preds, masks = [], []
        for i in range(0, len(x), CHUNK):
            pred, mask = self._fn("masked")(params, x[i:i + CHUNK], jax.random.fold_in(jax.random.key(seed), i))
            preds.append(np.asarray(pred, np.float32))
            masks.append(np.asarray(mask, np.float32))
        return np.concatenate(preds), np.concatenate(masks)

    def to_pixels(self, pred: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Predictions [N, L, P] -> patch pixels in [-1, 1]. With norm_pix_loss they are
        de-standardised with the true patches' own mean and variance (MAE's way of showing them)."""
        if not self.norm_pix:
            return pred
        patches = patchify(images_to_float(images), self.model.patch_size)
        mean, var = patches.mean(-1, keepdims=True), patches.var(-1, keepdims=True)
        return pred * np.sqrt(var + 1e-6) + mean

    def composite(self, images: np.ndarray, pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """uint8 images whose hidden patches (mask [N, L] == 1) are replaced by ``pixels``
        ([N, L, P] in [-1, 1], or a scalar)."""
        p, c = self.model.patch_size, self.model.in_channels
        patches = patchify(images_to_float(images), p)
        mixed = np.where(mask[..., None] > 0, pixels, patches)
        return images_to_uint8(unpatchify(mixed, p, c))

    # -- Run abilities -----------------------------------------------------------------------
    def encode(self, params, images):
        """uint8 [N, H, W, C] -> float32 [N, D], mean-pooled encoder tokens of all patches."""
        x = images_to_float(self.check_images(images))
        return map_chunked(lambda xb: self._fn("features")(params, xb), [x], CHUNK).astype(np.float32)

    def reconstruct(self, params, images):
        """uint8 [N, H, W, C] -> uint8: visible patches kept, hidden ones predicted (fixed masks)."""
        pred, mask = self.predict_masked(params, images)
        return self.composite(images, self.to_pixels(pred, images), mask)

    # -- previews and evaluation ------------------------------------------------------------
    def strip(self, params, images: np.ndarray) -> np.ndarray:
        """A uint8 grid: images, masked inputs (hidden patches mid-grey), reconstructions."""
        pred, mask = self.predict_masked(params, images)
        rows = np.concatenate([images, self.composite(images, 0.0, mask),  # 0.0 = mid-grey
                               self.composite(images, self.to_pixels(pred, images), mask)])
        return make_grid(rows, ncol=len(images), upscale=preview_upscale(images.shape[1]))

    def preview(self, params, batch):
        return self.strip(params, np.asarray(jax.device_get(batch["image"]))[:16])

    def target_patches(self, images: np.ndarray) -> np.ndarray:
        """The space errors are measured in: [N, L, P] pixel values in [0, 1], or standardised
        patches with norm_pix_loss."""
        patches = patchify(images_to_float(images), self.model.patch_size)
        if self.norm_pix:
            return np.asarray(losses.normalize_patches(jnp.asarray(patches)))
        return (patches + 1.0) / 2.0

    def masked_errors(self, params, train_images: np.ndarray, test_images: np.ndarray, draws: int) -> dict:
        """Masked-patch MSE of the model and of the mean-patch fill on ``draws`` masks per test image."""
        mean_patch = self.target_patches(train_images).mean(0)                     # [L, P]
        target = self.target_patches(test_images)                                  # [N, L, P]
        model_err, fill_err, count = 0.0, 0.0, 0.0
        for d in range(draws):
            pred, mask = self.predict_masked(params, test_images, seed=EVAL_SEED + d)
            pred = pred if self.norm_pix else (pred + 1.0) / 2.0                   # [-1, 1] -> [0, 1]
            w = mask[..., None]
            model_err += float(np.sum((pred - target) ** 2 * w))
            fill_err += float(np.sum((mean_patch[None] - target) ** 2 * w))
            count += float(np.sum(w)) * target.shape[-1]
        return {"masked_patch_mse": model_err / count, "mean_patch_fill_mse": fill_err / count}

    def probe_targets(self, ds) -> dict[str, np.ndarray]:
        """{name: int labels [N]}: the attributes listed in eval.probe_targets ("label" = ds.labels)."""
        out = {}
        for name in self.config.eval.probe_targets:
            if name == "label" and ds.labels is not None:
                out[name] = ds.labels
            elif name in ds.attributes:
                out[name] = ds.attributes[name]
            else:
                raise ConfigError(f"eval.probe_targets names {name!r}, which dataset {ds.name!r} does not "
                                  f"have; it has 'label'{''.join(', ' + repr(a) for a in ds.attributes)}.")
        return out

    def evaluate(self, run, out_dir):
        from jaxgen.eval.baselines import flatten01, linear_probe_accuracy

        e = self.config.eval
        train, test = self.load_data(self.config.data.train_split), self.load_data(self.config.data.eval_split)
        out = {"mask_ratio": float(self.model.mask_ratio),
               "error_space": "standardised patches" if self.norm_pix else "pixels in [0, 1]",
               **self.masked_errors(run.params, train.images, test.images, int(e.mask_draws))}
        out["ratio_to_mean_patch_fill"] = out["masked_patch_mse"] / out["mean_patch_fill_mse"]
        out["target_half_of_mean_fill_met"] = bool(out["ratio_to_mean_patch_fill"] < 0.5)
        ftr, fte = run.encode(train.images), run.encode(test.images)
        xtr, xte = flatten01(train.images), flatten01(test.images)
        ytr, yte = self.probe_targets(train), self.probe_targets(test)
        for name in ytr:
            out[f"probe_{name}_mae"] = linear_probe_accuracy(ftr, ytr[name], fte, yte[name])
            out[f"probe_{name}_pixels"] = linear_probe_accuracy(xtr, ytr[name], xte, yte[name])
        save_png(os.path.join(out_dir, "masked_reconstructions.png"), self.strip(run.params, test.images[spread_indices(len(test))]))
        return out
