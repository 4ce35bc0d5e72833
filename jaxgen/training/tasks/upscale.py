"""A text-guided latent upscaler trained on a frozen latent-diffusion run (task "upscale").

    python -m train --config configs/shapes_upscale.py --workdir runs/shapes_upscale --config.base_run=runs/shapes_ldm

The layout of diffusers' StableDiffusionUpscalePipeline (the SD x4 upscaler): a U-Net on the
autoencoder's latents, which have the low-resolution image's size (the base's autoencoder has
factor f = 4 for shapes: 8x8 -> 32x32), taking C + 3 channels (the noisy latents and the noised
low-resolution RGB image) and the noise level of that image as its class label. The base run
gives the autoencoder and text encoder, frozen, and the U-Net's start (``init_from``: conv_in
expanded C -> C + 3 with zeros, the class embedding new).

Training (what the upscaler learns): the low-resolution input is the image downsampled by f
(area average); it is noised by the low-res schedule (a DDPM linear schedule, as diffusers'
upscaler's low_res_scheduler) at a noise level drawn uniformly in [0, upscale.max_train_noise_level]
per example (noise-level augmentation), ``jaxgen.pipelines.upscale.upscale_condition``; the target
is the high-resolution image's latents under the base's objective; captions are dropped to the
empty prompt at upscale.caption_dropout.

Scaling: diffusers' upscale pipeline decodes latents / 0.08333 whatever the VAE says; this run
trains on the base's scaled latents (unit variance) and hands the pipeline (and the export) the
same autoencoder with its latent space rescaled by s / 0.08333 (``rescale_latent_space``: exact),
so the folder samples as the run does.

The run: ``run.upscale(images uint8 [N, h, w, 3], prompts, seed=0, noise_level=None,
num_steps=None, guidance_scale=None)`` -> uint8 [N, f h, f w, 3]. ``python -m train.eval``:
jaxgen/eval/upscale.py (docs/UPSCALE.md).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data.fields import Input
from jaxgen.data.pipeline import box_downsample
from jaxgen.diffusion.schedulers import scheduler_from_config
from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.vae import rescale_latent_space
from jaxgen.pipelines.upscale import UPSCALER_SCALING_FACTOR, upscale_condition
from jaxgen.training.config_values import check_range
from jaxgen.training.tasks.ldm_base import FrozenLDMTask


class UpscaleTask(FrozenLDMTask):
    """Task "upscale" (module docstring). Batches: {"latent_mean", "latent_std": float32
    [B, h, w, c]; "low_res": uint8 [B, h, w, 3]; "caption": int32 [B] rows of the context table}."""

    name = "upscale"
    abilities = ("upscale", "encode_text", "tokenizer")

    def __init__(self, config):
        super().__init__(config)
        u = config.get("upscale", None)
        if u is None:
            raise ConfigError("an upscale config needs config.upscale (see configs/shapes_upscale.py).")
        check_range("upscale.caption_dropout", u.caption_dropout, 0.0, 1.0, high_open=True)
        self.table = None

    def build_model(self):
        if self.config.model_class != "jaxgen.nn.unet:UNet2DConditionModel":
            raise ConfigError(f"model_class={self.config.model_class!r}: an upscale run trains a "
                              "jaxgen.nn.unet:UNet2DConditionModel (the base's, widened).")
        extra = set(self.config.model) - {"in_channels", "num_class_embeds"}
        if extra:
            raise ConfigError(f"config.model sets {', '.join(sorted(extra))}: an upscale run sets only in_channels "
                              "and num_class_embeds; every other field is the base U-Net's.")
        c = int(self.ldm.vae.latent_channels)
        if int(self.config.model.in_channels) != c + 3:
            raise ConfigError(f"model.in_channels={self.config.model.in_channels}: the upscaler's U-Net takes the "
                              f"{c} latent channels + 3 low-res image channels = {c + 3}.")
        u = self.config.upscale
        n = int(self.config.model.num_class_embeds)
        check_range("upscale.max_noise_level", u.max_noise_level, 0, n - 1,
                    hint="the U-Net embeds noise levels 0 .. num_class_embeds - 1")
        check_range("upscale.max_train_noise_level", u.max_train_noise_level, 0, int(u.max_noise_level))
        check_range("upscale.noise_level", u.noise_level, 0, int(u.max_noise_level))
        self.low_res_scheduler = scheduler_from_config(dict(u.low_res_scheduler))
        return self.ldm.model.clone(in_channels=c + 3, num_class_embeds=n)

    @property
    def low_res_shape(self) -> tuple[int, int, int]:
        h, w, _ = self.latent_shape
        return h, w, 3

    # -- data ----------------------------------------------------------------------------------
    def inputs(self) -> dict[str, Input]:
        return {"image": Input("image", self.image_shape, doc="the high-resolution image"),
                "caption": Input("text", doc="its caption")}

    def batch_arrays(self, ds):
        fields = self.gather(ds)
        captions = list(fields["caption"])
        texts = sorted(set(captions))
        index = {t: i for i, t in enumerate(texts)}
        self.table = self.context_table(texts)
        mean, std = self.latent_moments(fields["image"])
        return {"latent_mean": mean, "latent_std": std, "low_res": box_downsample(fields["image"], self.ldm.vae_factor),
                "caption": np.asarray([index[t] for t in captions], np.int32)}

    def example_batch(self) -> dict:
        z = np.zeros((1, *self.latent_shape), np.float32)
        return {"latent_mean": z, "latent_std": z, "low_res": np.zeros((1, *self.low_res_shape), np.uint8),
                "caption": np.zeros((1,), np.int32)}

    # -- model ---------------------------------------------------------------------------------
    def init_params(self, key, batch) -> Any:
        h, w, c = self.latent_shape
        ctx = jnp.zeros((1, 77, self.ldm.context_dim), jnp.float32)
        return self.model.init(key, jnp.zeros((1, h, w, c + 3), jnp.float32), jnp.zeros((1,), jnp.int32), ctx,
                               class_labels=jnp.zeros((1,), jnp.int32))["params"]

    def loss_fn(self, params, batch, key):
        if self.table is None:
            raise ConfigError("UpscaleTask.loss_fn needs batch_arrays(...) first (the text context table).")
        u = self.config.upscale
        k_noise, k_level, k_img = jax.random.split(key, 3)
        zt, t, target, ctx, _ = self.diffusion_inputs(k_noise, batch["latent_mean"], batch["latent_std"],
                                                      batch["caption"], self.table, float(u.caption_dropout))
        b = zt.shape[0]
        level = jax.random.randint(k_level, (b,), 0, int(u.max_train_noise_level) + 1, jnp.int32)
        low = batch["low_res"].astype(jnp.float32) / 127.5 - 1.0
        cond = upscale_condition(low, jax.random.normal(k_img, low.shape, jnp.float32), level,
                                 self.low_res_scheduler.alphas_cumprod)
        out = self.model.apply({"params": params}, jnp.concatenate([zt, cond], axis=-1), t, ctx, class_labels=level)
        loss, mse = self.weighted_mse(out, target, t)
        return loss, {"mse": mse}

    # -- the run ---------------------------------------------------------------------------------
    def pipeline_components(self, params) -> dict[str, Any]:
        """The stack as a diffusers StableDiffusionUpscalePipeline: this U-Net, the base's
        autoencoder with its latent space rescaled for scaling_factor 0.08333, the text encoder,
        tokenizer and scheduler, the low-res scheduler and max_noise_level."""
        c = self.ldm.pipeline_components(self.base_params)
        vae, vae_params = c["vae"]
        ratio = float(self.ldm.scaling_factor) / UPSCALER_SCALING_FACTOR
        c["vae"] = (vae.clone(scaling_factor=UPSCALER_SCALING_FACTOR), rescale_latent_space(vae, vae_params, ratio))
        c["unet"] = (self.model, params)
        c["low_res_scheduler"] = self.low_res_scheduler
        c["max_noise_level"] = int(self.config.upscale.max_noise_level)
        c["pipeline_class"] = "StableDiffusionUpscalePipeline"
        return c

    def pipeline(self, params):
        from jaxgen.pipelines.upscale import StableDiffusionUpscalePipeline

        cached = getattr(self, "_pipe", None)
        if cached is not None and cached[0] is params:
            return cached[1]
        c = self.pipeline_components(params)
        pipe = StableDiffusionUpscalePipeline(
            c["unet"][0], c["vae"][0], c["text_encoder"][0], {k: c[k][1] for k in ("unet", "vae", "text_encoder")},
            c["tokenizer"], c["scheduler"], low_res_scheduler=c["low_res_scheduler"],
            max_noise_level=c["max_noise_level"])
        self._pipe = (params, pipe)
        return pipe

    def upscale(self, params, images, prompts, seed=0, noise_level=None, num_steps=None,
                guidance_scale=None) -> np.ndarray:
        """uint8 low-resolution images [N, h, w, 3] (h, w: the image size / the autoencoder's factor)
        with ``prompts`` (one str for all, or N) -> uint8 [N, H, W, 3]."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.low_res_shape:
            raise DataError(f"run.upscale takes uint8 images [N, {', '.join(map(str, self.low_res_shape))}] (the "
                            f"{self.image_shape[0]}x{self.image_shape[1]} size / {self.ldm.vae_factor}), got "
                            f"{images.dtype} {images.shape}.")
        prompts = self.ldm.sample_prompts(len(images), prompts)
        steps, g, sched = self.sampling_settings(num_steps, guidance_scale, None)
        level = int(self.config.upscale.noise_level if noise_level is None else noise_level)
        return self.ldm.pipeline_samples(self.pipeline(params), prompts, seed, steps, g, sched,
                                         per_image={"image": images}, sized=False, noise_level=level)

    def encode_text(self, params, texts) -> np.ndarray:
        return self.ldm.encode_text(self.base_params, texts)

    def evaluate(self, run, out_dir: str) -> dict:
        from jaxgen.eval import upscale as upscale_eval

        return upscale_eval.evaluate(run, out_dir, self.config.get("eval", None))
