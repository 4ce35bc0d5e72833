"""Text-guided 4x super-resolution: diffusers' StableDiffusionUpscalePipeline (the Stable Diffusion
x4 upscaler), the whole denoising loop one compiled program.

    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder)       # diffusers layout
    images = pipe("a white cat", image=low_res, noise_level=20, num_inference_steps=75,
                  guidance_scale=9.0, seed=0)
    # low_res: float [N, h, w, 3] in [0, 1] or uint8; images: float32 numpy [N, f h, f w, 3] in
    # [0, 1], f the VAE's factor (4 for the real upscaler)

What one call does (diffusers' behaviour, reproduced):

* The low-res image goes to [-1, 1] and is noised once by the low-res scheduler (a DDPM
  schedule): ``c = sqrt(a[l]) x + sqrt(1 - a[l]) image_noise`` at noise level l
  (``upscale_condition``). Its latents have the low-res image's size: [B, h, w, C].
* Every U-Net call takes ``concat([scheduler.scale_model_input(latents), c], channels)``
  (C + 3 channels; the same c in both halves of classifier-free guidance) and
  ``class_labels = l`` for every row (the U-Net's class embedding, ``num_class_embeds``; a U-Net
  without a class embedding gets none, which is what diffusers' U-Net does with them).
* Text, guidance (guidance_scale > 1), the scheduler loop and decoding are
  StableDiffusionPipeline's (the upscaler hooks in with a ``LoopControl``); the VAE decodes
  ``latents / 0.08333``: diffusers' upscale pipeline sets the VAE's scaling_factor to 0.08333
  whatever its config says (with a deprecation warning), and ignores any shift_factor; jaxgen
  does the same, with a warning, so a folder decodes identically in both.

Training an upscaler with the same conditioning: draw a noise level l in [0, max_noise_level]
per example, build ``upscale_condition(low_res, noise, l, low_res_scheduler.alphas_cumprod)``,
feed the U-Net ``concat([noisy_latents, condition], -1)`` with ``class_labels=l``, and scale the
VAE latents by ``UPSCALER_SCALING_FACTOR``; then sample through this pipeline built in memory:
``StableDiffusionUpscalePipeline(unet, vae, text_encoder, params, tokenizer, scheduler,
low_res_scheduler, max_noise_level)``.

Deliberate differences from diffusers: the low-res image must already have a size that is a
multiple of the VAE factor (diffusers resizes it down to one: resize first); one image per
prompt, and with num_images_per_prompt > 1 image i stays with prompt i (diffusers tiles the
images, pairing image 1 with prompt 0's second sample); prompts are the only text input (no
prompt_embeds, clip_skip, LoRA scale); no safety checker, no watermarker (diffusers applies it to
PIL output only).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.config import read_json
from jaxgen.diffusion.schedulers import scheduler_from_config
from jaxgen.diffusion.schedulers.base import SCHEDULER_CONFIG_NAME, Scheduler
from jaxgen.errors import ConfigError, DataError
from jaxgen.pipelines.stable_diffusion import (_KEY_IMAGE, _KEY_LATENTS, _TRACES, LoopControl,
                                               StableDiffusionPipeline, as_images, as_texts, root_key)

log = logging.getLogger(__name__)

F32 = jnp.float32
UPSCALE_PIPELINE_CLASSES = ("StableDiffusionUpscalePipeline",)
# the VAE scaling factor diffusers' upscale pipeline forces (its __init__ overwrites the VAE config)
UPSCALER_SCALING_FACTOR = 0.08333
DEFAULT_MAX_NOISE_LEVEL = 350
# low-res schedulers whose add_noise is sqrt(a_t) x + sqrt(1 - a_t) noise (diffusers wants a DDPM)
VP_LOW_RES_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
# class embeddings that take the noise level as an int label [B]
LABEL_CLASS_EMBEDS = (None, "timestep")


def upscale_condition(low_res: jax.Array, noise: jax.Array, noise_level, alphas_cumprod: jax.Array) -> jax.Array:
    """The noised low-res conditioning image of the x4 upscaler (pure, jittable; training and the
    pipeline use it alike): ``sqrt(a[l]) low_res + sqrt(1 - a[l]) noise`` with a the low-res
    scheduler's alpha_bar table (diffusers' ``low_res_scheduler.add_noise``).

    low_res: [N, h, w, 3] in [-1, 1]; noise: unit Gaussian of the same shape; noise_level: int
    scalar or [N] (each in [0, len(alphas_cumprod))); alphas_cumprod: [T] float (e.g.
    ``DDPMScheduler(...).alphas_cumprod``). Returns [N, h, w, 3] float32.
    The U-Net then takes ``concat([scaled_latents, condition], -1)`` with ``class_labels=noise_level``.
    """
    a = jnp.asarray(alphas_cumprod, F32)[jnp.asarray(noise_level, jnp.int32)]
    a = a.reshape(a.shape + (1,) * (low_res.ndim - a.ndim))
    x = jnp.asarray(low_res, F32)
    return jnp.sqrt(a) * x + jnp.sqrt(1.0 - a) * jnp.asarray(noise, F32)


@dataclasses.dataclass(frozen=True)
class UpscaleConditioning(LoopControl):
    """The loop hook (static part): the noised low-res image concatenated after the scaled
    latents of every U-Net call, and the noise level as class labels.

    inputs (traced): {"image": [B, h, w, 3] the condition, "noise_level": int32 []}.
    class_labels: whether the U-Net has a class embedding to take them.
    """

    class_labels: bool

    def unet_kwargs(self, inputs, x_in, t, i, context, cfg: bool) -> dict[str, Any]:
        if not self.class_labels:
            return {}
        rows = x_in.shape[0] * (2 if cfg else 1)
        return {"class_labels": jnp.broadcast_to(inputs["noise_level"], (rows,))}

    def unet_input(self, inputs, x_in, t, i, context) -> jax.Array:
        return jnp.concatenate([x_in, inputs["image"].astype(x_in.dtype)], axis=-1)


@functools.partial(jax.jit, static_argnames=("per_prompt",))
def _condition_stage(images, noise, noise_level, alphas_cumprod, *, per_prompt: int):
    """images [N, h, w, 3] in [0, 1] -> the condition [N per_prompt, h, w, 3] (image i repeated
    for prompt i's images)."""
    _TRACES["upscale_condition"] += 1
    cond = upscale_condition(2.0 * images - 1.0, noise, noise_level, alphas_cumprod)
    return jnp.repeat(cond, per_prompt, axis=0)


class StableDiffusionUpscalePipeline(StableDiffusionPipeline):
    """The Stable Diffusion x4 upscaler (diffusers' StableDiffusionUpscalePipeline).

    ``pipe(prompt, image=low_res, ...)`` returns float32 numpy [B, f h, f w, 3] in [0, 1].
    Attributes: those of StableDiffusionPipeline (the VAE with scaling_factor 0.08333), and
    ``low_res_scheduler`` (a jaxgen DDPM-family scheduler: its ``alphas_cumprod`` noises the
    low-res image) and ``max_noise_level``.
    """

    def __init__(self, unet, vae, text_encoder, params: Mapping[str, Any], tokenizer, scheduler: Scheduler,
                 low_res_scheduler: Scheduler, max_noise_level: int = DEFAULT_MAX_NOISE_LEVEL, **kwargs):
        """As StableDiffusionPipeline's (scheduler_config, use_attention_mask, mesh, batch_axis as
        keywords), plus low_res_scheduler (DDPMScheduler, DDIMScheduler or PNDMScheduler: its
        alpha_bar table) and max_noise_level (the largest noise_level a call accepts)."""
        name = type(low_res_scheduler).__name__
        if not isinstance(low_res_scheduler, Scheduler) or name not in VP_LOW_RES_SCHEDULERS:
            raise ConfigError(f"StableDiffusionUpscalePipeline: low_res_scheduler is a {name}; pass a jaxgen "
                              f"{' / '.join(VP_LOW_RES_SCHEDULERS)} (diffusers uses a DDPMScheduler).")
        steps = int(low_res_scheduler.alphas_cumprod.shape[0])
        if isinstance(max_noise_level, bool) or not isinstance(max_noise_level, (int, np.integer)) \
                or not 0 <= max_noise_level < steps:
            raise ConfigError(f"StableDiffusionUpscalePipeline: max_noise_level={max_noise_level!r}; it must be an "
                              f"int in [0, {steps - 1}] (the low-res scheduler's timesteps).")
        if unet.class_embed_type not in LABEL_CLASS_EMBEDS:
            raise ConfigError(f"StableDiffusionUpscalePipeline: the U-Net has class_embed_type="
                              f"{unet.class_embed_type!r}, which takes vectors; the upscaler passes the noise "
                              "level as class_labels: use num_class_embeds (or class_embed_type='timestep').")
        if unet.class_embed_type is None and unet.num_class_embeds is not None \
                and max_noise_level >= unet.num_class_embeds:
            raise ConfigError(f"StableDiffusionUpscalePipeline: max_noise_level={max_noise_level} but the U-Net "
                              f"embeds only {unet.num_class_embeds} noise levels (num_class_embeds); lower "
                              "max_noise_level or raise num_class_embeds.")
        if vae.scaling_factor != UPSCALER_SCALING_FACTOR or vae.shift_factor is not None:
            log.warning("StableDiffusionUpscalePipeline: the VAE has scaling_factor=%s, shift_factor=%s; using "
                        "scaling_factor=%s and no shift, as diffusers' upscale pipeline does (it overwrites "
                        "the VAE config).", vae.scaling_factor, vae.shift_factor, UPSCALER_SCALING_FACTOR)
            vae = vae.clone(scaling_factor=UPSCALER_SCALING_FACTOR, shift_factor=None)
        super().__init__(unet, vae, text_encoder, params, tokenizer, scheduler, **kwargs)
        self.low_res_scheduler = low_res_scheduler
        self.max_noise_level = int(max_noise_level)

    def _check_unet_channels(self, unet, vae) -> None:
        """The U-Net takes the latents and the 3 channels of the low-res image."""
        if unet.in_channels != vae.latent_channels + 3:
            raise ConfigError(f"StableDiffusionUpscalePipeline: the U-Net takes {unet.in_channels} channels; the "
                              f"upscaler feeds it the VAE's {vae.latent_channels} latent channels + 3 low-res "
                              f"image channels = {vae.latent_channels + 3}.")

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                        batch_axis: str | None = None, allow_pickle: bool = False, dtype=None):
        """Load a diffusers StableDiffusionUpscalePipeline folder (unet/, vae/, text_encoder/,
        tokenizer/, scheduler/, low_res_scheduler/; max_noise_level from model_index.json).
        mesh, batch_axis, allow_pickle, dtype: as StableDiffusionPipeline.from_pretrained."""
        folder = os.fspath(folder)
        parts, index = cls.load_components(folder, pipeline_classes=UPSCALE_PIPELINE_CLASSES,
                                           others=("low_res_scheduler", "watermarker"), allow_pickle=allow_pickle,
                                           dtype=dtype)
        spec = index.get("low_res_scheduler")
        if not isinstance(spec, (list, tuple)) or spec[0] is None:
            raise ConfigError(f"{folder}/model_index.json has no 'low_res_scheduler' component; an upscale "
                              "folder needs one (a DDPMScheduler).")
        mark = index.get("watermarker")
        if isinstance(mark, (list, tuple)) and mark[0] is not None:
            log.warning("%s: the watermarker (%s) is not run (diffusers applies it to PIL output only).",
                        folder, mark[1])
        low_res = scheduler_from_config(read_json(os.path.join(folder, "low_res_scheduler", SCHEDULER_CONFIG_NAME)))
        return cls(**parts, low_res_scheduler=low_res,
                   max_noise_level=index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL), mesh=mesh,
                   batch_axis=batch_axis)

    # -- the call ---------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str], image=None, negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 75, guidance_scale: float = 9.0, noise_level: int = 20, latents=None,
                 image_noise=None, scheduler=None, seed: int = 0, *, num_images_per_prompt: int = 1,
                 eta: float = 0.0, output_type: str = "np") -> np.ndarray:
        """Upscale low-res images by the VAE's factor, guided by prompts.

        prompt: a string or P strings; image: the low-res images, float [P, h, w, 3] in [0, 1] or
            uint8 (one [h, w, 3] for one prompt), one per prompt; h, w multiples of the VAE factor.
        negative_prompt: None (""), one string, or P strings (used when guidance_scale > 1).
        noise_level: int in [0, max_noise_level]: how much noise the low-res image gets (and the
            U-Net's class label).
        latents: unit Gaussian [B, h, w, C] (B = P * num_images_per_prompt), times the scheduler's
            init_noise_sigma; image_noise: unit Gaussian [P, h, w, 3], the low-res augmentation
            noise. Both are drawn from ``seed`` when not given (fold_in 0 and 1 of its root).
        scheduler, eta, output_type: as StableDiffusionPipeline.__call__ ("latent": [B, h, w, C]).
        Returns float32 [B, f h, f w, 3] in [0, 1].
        """
        if image is None:
            raise DataError("image= (the low-res images) is required: float [N, h, w, 3] in [0, 1] or uint8.")
        images = as_images(image, "upscale image")
        prompts = as_texts(prompt, "prompt")
        per_prompt = self._per_prompt(num_images_per_prompt)
        if images.shape[0] != len(prompts):
            raise DataError(f"{images.shape[0]} low-res images for {len(prompts)} prompts; pass one image per "
                            "prompt (as diffusers).")
        level = self._check_noise_level(noise_level)
        n, h, w, _ = images.shape
        f = self.vae_scale_factor
        if h % f or w % f:
            raise DataError(f"upscale image: {h}x{w} pixels; the low-res size must be a multiple of {f} (the VAE "
                            f"factor; diffusers resizes it down to {h // f * f}x{w // f * f}): resize first.")
        batch = n * per_prompt
        root = root_key(seed)
        latents = self._noise(latents, root, _KEY_LATENTS, (batch, h, w, self.vae.latent_channels), "latents")
        image_noise = self._noise(image_noise, root, _KEY_IMAGE, (n, h, w, 3), "image_noise")
        cond = _condition_stage(jnp.asarray(images), image_noise, jnp.asarray(level, jnp.int32),
                                self.low_res_scheduler.alphas_cumprod, per_prompt=per_prompt)
        if self._batch_sharding is not None:
            cond = jax.device_put(cond, self._batch_sharding)
        control = UpscaleConditioning(class_labels=self.unet.class_embed_type is not None
                                      or self.unet.num_class_embeds is not None)
        inputs = {"image": cond, "noise_level": jnp.asarray(level, jnp.int32)}
        return self._run("text", prompts, negative_prompt, num_inference_steps, guidance_scale, 0.0, scheduler, eta,
                         per_prompt, output_type, root, strength=1.0, inputs={"noise": latents}, control=control,
                         control_inputs=inputs)

    def _check_noise_level(self, noise_level) -> int:
        if isinstance(noise_level, (bool, np.bool_)) or not isinstance(noise_level, (int, np.integer)):
            raise TypeError(f"noise_level={noise_level!r}; it must be an int in [0, {self.max_noise_level}].")
        if noise_level > self.max_noise_level:
            raise ValueError(f"noise_level={noise_level} exceeds max_noise_level={self.max_noise_level}; pass "
                             f"0 <= noise_level <= {self.max_noise_level}.")
        if noise_level < 0:
            raise ValueError(f"noise_level={noise_level} is negative; pass 0 <= noise_level <= {self.max_noise_level}.")
        return int(noise_level)

    # The inherited image-to-image and inpainting calls would feed the U-Net latents only.
    def img2img(self, *args, **kwargs):
        raise ConfigError("StableDiffusionUpscalePipeline has no image-to-image call; call the pipeline with "
                          "image= (the low-res images) to upscale.")

    def inpaint(self, *args, **kwargs):
        raise ConfigError("StableDiffusionUpscalePipeline has no inpainting call; call the pipeline with "
                          "image= (the low-res images) to upscale.")
