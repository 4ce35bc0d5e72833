"""InstructPix2Pix (Brooks et al. 2023, arXiv 2211.09800): edit an image by a written instruction,
numerically diffusers' StableDiffusionInstructPix2PixPipeline, the denoising loop one compiled program.

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)    # 8-channel U-Net
    images = pipe("make it blue", image, num_inference_steps=100, guidance_scale=7.5,
                  image_guidance_scale=1.5, seed=0)
    # image: float [N, H, W, 3] in [0, 1] or uint8; images: float32 numpy [B, H, W, 3] in [0, 1]

What one call does (as diffusers):

* The U-Net takes 2C input channels: the scaled noisy latents (C = the VAE's latent channels) and,
  after them on the channel axis, the image latents: the VAE posterior's mode (its mean) of the
  input image in [-1, 1], NOT multiplied by ``scaling_factor``. The scheduler's
  ``scale_model_input`` scales the noisy latents only; the image latents are concatenated after it.
* Guidance is on when ``guidance_scale > 1`` and ``image_guidance_scale >= 1``. Then the U-Net runs
  one batch of 3B: (prompt, image), (negative prompt, image), (negative prompt, zero image
  latents), and the prediction is
  ``uncond + guidance_scale (text - image) + image_guidance_scale (image - uncond)``
  (``ip2p_guidance``). Otherwise it runs the prompt with the image only (B), and both scales and
  the negative prompt are unused (so ``image_guidance_scale < 1`` switches text guidance off too).
* Latents: unit Gaussian noise (``latents=`` or drawn from ``seed``) times the scheduler's
  ``init_noise_sigma``; the VAE decodes ``latents / scaling_factor``; images are
  ``clip(x / 2 + 0.5, 0, 1)``.

Reusable pieces (pure, jittable; a training run can sample with them): ``image_latents`` (the
conditioning latents of images), ``ip2p_unet_input`` / ``ip2p_context`` (the U-Net batch),
``ip2p_guidance`` (the 3-way combination), ``ip2p_noise_pred`` (one guided U-Net evaluation) and
``ip2p_sample_loop`` (the whole loop under ``lax.scan``).

Compilation: the text encoder and the decoder are StableDiffusionPipeline's compiled stages; the
image encoder ("ip2p_image") and the loop ("ip2p_loop") are this module's. The loop is compiled
per shape, scheduler, step count and guidance on/off; prompts, images, noise and both guidance
scales are arrays, so changing them does not retrace (``trace_counts()``).

Deliberate differences from diffusers: prompts are the only text input (no prompt_embeds, no
IP-Adapter); images must already be RGB at a multiple of the VAE factor (diffusers resizes them
down to one) and cannot be given as latents; with one image per prompt and
num_images_per_prompt > 1, image i stays with prompt i (diffusers tiles the images, pairing image
0 with prompt 1); a single negative prompt applies to every prompt; no safety checker.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.sampling import sample_loop
from jaxgen.diffusion.schedulers.base import Scheduler
from jaxgen.errors import ConfigError, DataError
from jaxgen.lora import materialize
from jaxgen.pipelines.stable_diffusion import (_KEY_LATENTS, _KEY_STEPS, _TRACES, PIPELINE_CLASSES,
                                               StableDiffusionPipeline, _constrain, _decode_stage, _expand,
                                               _step_params, _text_stage, as_images, as_texts, root_key)

F32 = jnp.float32
IP2P_PIPELINE_CLASSES = PIPELINE_CLASSES + ("StableDiffusionInstructPix2PixPipeline",)


# ------------------------------------------------------------------------------------------------
# pure pieces
# ------------------------------------------------------------------------------------------------
def guidance_active(guidance_scale: float, image_guidance_scale: float) -> bool:
    """diffusers' rule: the 3-way guidance runs when guidance_scale > 1 and image_guidance_scale >= 1."""
    return float(guidance_scale) > 1.0 and float(image_guidance_scale) >= 1.0


def ip2p_guidance(noise_pred: jax.Array, guidance_scale, image_guidance_scale) -> jax.Array:
    """The InstructPix2Pix guidance of one 3-way U-Net output.

    noise_pred: [3B, ...], the rows (prompt + image, negative + image, negative + no image) as
    ``ip2p_unet_input`` / ``ip2p_context`` order them; guidance_scale, image_guidance_scale: []
    floats (traced or Python). Returns [B, ...]:
    uncond + guidance_scale (text - image) + image_guidance_scale (image - uncond).
    """
    text, image, uncond = jnp.split(noise_pred, 3, axis=0)
    return uncond + guidance_scale * (text - image) + image_guidance_scale * (image - uncond)


def ip2p_unet_input(x_in: jax.Array, image_latents: jax.Array, guided: bool) -> jax.Array:
    """The U-Net's input: x_in [B, h, w, C] (latents after ``scale_model_input``) and image_latents
    [B, h, w, C'] on the channel axis -> [B, h, w, C + C'], or with guidance [3B, h, w, C + C']:
    x_in three times beside (image, image, zeros)."""
    image_latents = image_latents.astype(x_in.dtype)
    if guided:
        x_in = jnp.concatenate([x_in, x_in, x_in], axis=0)                             # [3B, h, w, C]
        image_latents = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)], axis=0)
    return jnp.concatenate([x_in, image_latents], axis=-1)


def ip2p_context(cond: jax.Array, uncond: jax.Array | None, guided: bool) -> jax.Array:
    """The cross-attention context matching ``ip2p_unet_input``: cond [B, L, D], or with guidance
    [3B, L, D] = (cond, uncond, uncond) (uncond: the negative / empty prompt's [B, L, D])."""
    if not guided:
        return cond
    if uncond is None:
        raise ValueError("InstructPix2Pix guidance needs the negative (or empty) prompt's context: pass uncond.")
    return jnp.concatenate([cond, uncond, uncond], axis=0)


def ip2p_noise_pred(unet, unet_params, x_in: jax.Array, t, image_latents: jax.Array, cond: jax.Array,
                    uncond: jax.Array | None, guidance_scale=7.5, image_guidance_scale=1.5, *,
                    guided: bool) -> jax.Array:
    """One U-Net evaluation of the loop, guided: x_in [B, h, w, C] scaled latents; t [] timestep;
    image_latents [B, h, w, C'] (``image_latents``); cond / uncond [B, L, D] contexts; guided: a
    Python bool (``guidance_active``). Returns the (guided) prediction [B, h, w, out_channels]."""
    model_in = ip2p_unet_input(x_in, image_latents, guided)
    out = unet.apply({"params": unet_params}, model_in, jnp.broadcast_to(t, (model_in.shape[0],)),
                     ip2p_context(cond, uncond, guided))
    return ip2p_guidance(out, guidance_scale, image_guidance_scale) if guided else out


def image_latents(vae, vae_params, images: jax.Array) -> jax.Array:
    """The conditioning latents of images: images float [N, H, W, 3] in [0, 1] -> the VAE
    posterior's mode (mean) of 2 images - 1, [N, H/f, W/f, C], unscaled (as diffusers, and as
    diffusers' InstructPix2Pix training script encodes the original images)."""
    return vae.apply({"params": vae_params}, 2.0 * images - 1.0, method="encode").mode()


def ip2p_sample_loop(unet, unet_params, scheduler: Scheduler, state, noise: jax.Array, image_lat: jax.Array,
                     cond: jax.Array, uncond: jax.Array | None, guidance_scale=7.5, image_guidance_scale=1.5, *,
                     guided: bool, key: jax.Array | None = None, step_kwargs: Mapping[str, Any] | None = None,
                     sharding=None) -> jax.Array:
    """The InstructPix2Pix denoising loop (one lax.scan over state.timesteps), pure.

    noise: [B, h, w, C] unit Gaussian (times init_noise_sigma here); image_lat: [B, h, w, C']
    (``image_latents``, expanded to B); cond / uncond: [B, L, D]; key: the per-step noise root of
    stochastic schedulers; step_kwargs: scheduler.step options (DDIM's eta); sharding: optional
    sharding constraint of the batch. Returns the final latents [B, h, w, C].
    """

    def model_fn(x_in, t, _cond):
        return ip2p_noise_pred(unet, unet_params, _constrain(x_in, sharding), t, image_lat, cond, uncond,
                               guidance_scale, image_guidance_scale, guided=guided)

    return sample_loop(scheduler, state, model_fn, _constrain(noise, sharding), key=key,
                       step_kwargs=step_kwargs)


# ------------------------------------------------------------------------------------------------
# compiled stages
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _EditPlan:
    """The static part of the loop program (with the input shapes)."""

    scheduler: Scheduler
    guided: bool
    step_kwargs: tuple                # scheduler.step options, as sorted (name, value) pairs
    sharding: Any                     # NamedSharding of the batch axis, or None


@functools.partial(jax.jit, static_argnames=("vae", "batch", "sharding"))
def _image_stage(vae, params, images, *, batch: int, sharding):
    """images [N, H, W, 3] in [0, 1] -> image latents [B, h, w, C] (N = 1, P or B, see _expand)."""
    _TRACES["ip2p_image"] += 1
    return _constrain(_expand(image_latents(vae, params, images), batch), sharding)


@functools.partial(jax.jit, static_argnames=("unet", "plan"))
def _loop_stage(unet, params, state, context, noise, image_lat, guidance_scale, image_guidance_scale, step_key,
                *, plan: _EditPlan):
    _TRACES["ip2p_loop"] += 1
    params = materialize(params)                                               # unfused LoRA
    return ip2p_sample_loop(unet, params, plan.scheduler, state, noise, image_lat, context["cond"],
                            context.get("uncond"), guidance_scale, image_guidance_scale, guided=plan.guided,
                            key=step_key, step_kwargs=dict(plan.step_kwargs), sharding=plan.sharding)


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------
class StableDiffusionInstructPix2PixPipeline(StableDiffusionPipeline):
    """Instruction-based image editing with an InstructPix2Pix U-Net (diffusers'
    StableDiffusionInstructPix2PixPipeline): ``pipe(prompt, image, ...)`` returns float32 numpy
    [B, H, W, 3] in [0, 1] with B = prompts * num_images_per_prompt.

    Built like StableDiffusionPipeline: ``from_pretrained(folder)``, or
    ``StableDiffusionInstructPix2PixPipeline(unet, vae, text_encoder, params, tokenizer, scheduler)``
    from in-memory modules and parameter trees; the U-Net must take 2 x the VAE's latent channels.
    Attributes as StableDiffusionPipeline. Text-to-image, img2img and inpainting are refused (the
    U-Net needs image latents).
    """

    def _check_unet_channels(self, unet, vae) -> None:
        c = vae.latent_channels
        if unet.in_channels != 2 * c:
            kind = {c: "a text-to-image U-Net: load it with jaxgen.StableDiffusionPipeline",
                    9: "an inpainting U-Net: use jaxgen.StableDiffusionPipeline.inpaint"}.get(
                unet.in_channels, "not an InstructPix2Pix U-Net")
            raise ConfigError(f"StableDiffusionInstructPix2PixPipeline: the U-Net takes {unet.in_channels} input "
                              f"channels ({kind}); InstructPix2Pix needs {2 * c} ({c} latent + {c} image-latent).")
        if unet.out_channels != c:
            raise ConfigError(f"StableDiffusionInstructPix2PixPipeline: the U-Net predicts {unet.out_channels} "
                              f"channels; it must predict the VAE's {c} latent channels.")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                        batch_axis: str | None = None, allow_pickle: bool = False, dtype=None):
        """Load a diffusers StableDiffusionInstructPix2PixPipeline folder (``save_pretrained``
        layout; an SD folder holding an 8-channel U-Net is accepted too). mesh, batch_axis,
        allow_pickle, dtype: as StableDiffusionPipeline.from_pretrained."""
        parts, _ = cls.load_components(folder, pipeline_classes=IP2P_PIPELINE_CLASSES, allow_pickle=allow_pickle,
                                       dtype=dtype)
        return cls(**parts, mesh=mesh, batch_axis=batch_axis)

    def __call__(self, prompt: str | Sequence[str], image=None, num_inference_steps: int = 100,
                 guidance_scale: float = 7.5, image_guidance_scale: float = 1.5,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 eta: float = 0.0, seed: int = 0, latents=None, scheduler=None, *,
                 output_type: str = "np") -> np.ndarray:
        """Edit images by instructions (diffusers' StableDiffusionInstructPix2PixPipeline.__call__).

        prompt: an instruction or P of them (non-empty). image: float [N, H, W, 3] in [0, 1] or
            uint8 (one [H, W, 3] is N = 1); H, W multiples of vae_scale_factor (the output size);
            N = 1 (one image for every prompt), P (image i for prompt i) or B (one per output).
        guidance_scale, image_guidance_scale: see the module docstring (guidance needs
            guidance_scale > 1 and image_guidance_scale >= 1). negative_prompt: None (the empty
            prompt), one string for all, or P strings; used only with guidance.
        seed: int or typed key, the root of every draw not given; latents: unit Gaussian
            [B, H/f, W/f, C] (NHWC), multiplied by init_noise_sigma, as diffusers' ``latents=``.
        scheduler: a jaxgen Scheduler or a diffusers class name (built from the folder's config).
        eta: DDIM's eta. output_type: "np" (images) or "latent" ([B, H/f, W/f, C]).
        """
        if image is None:
            raise DataError("image= (the image to edit) is required: float [N, H, W, 3] in [0, 1] or uint8.")
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type={output_type!r}; use 'np' (images) or 'latent'.")
        prompts = as_texts(prompt, "prompt")
        images = as_images(image, "InstructPix2Pix image")
        per_prompt = self._per_prompt(num_images_per_prompt)
        batch = len(prompts) * per_prompt
        self._check_count(images.shape[0], len(prompts), batch, "image")
        height, width = self._size(images.shape[1], images.shape[2], what="InstructPix2Pix image")
        guided = self._guidance(guidance_scale, image_guidance_scale)
        sched = self.get_scheduler(scheduler)
        state = sched.set_timesteps(num_inference_steps)
        step_kwargs = {}
        if eta:
            if "eta" not in _step_params(sched):
                raise ValueError(f"eta={eta} applies to DDIMScheduler only; {type(sched).__name__} has no eta. "
                                 "Leave eta at 0.")
            step_kwargs["eta"] = float(eta)
        f = self.vae_scale_factor
        root = root_key(seed)
        noise = self._noise(latents, root, _KEY_LATENTS, (batch, height // f, width // f, self.vae.latent_channels),
                            "latents")
        sharding = self._batch_sharding
        if sharding is not None:
            size = self.mesh.shape[self.batch_axis]
            if batch % size:
                raise ValueError(f"{batch} images do not split over the {size} devices of mesh axis "
                                 f"{self.batch_axis!r}; make the batch (prompts x num_images_per_prompt) a "
                                 "multiple of it.")
            noise = jax.device_put(noise, sharding)
        params = self.lora_call_params()     # unfused LoRA adapters ride along (jaxgen/lora.py)
        ids, mask = self._tokenize_prompts(prompts, negative_prompt, guided)
        context = _text_stage(self.text_encoder, params["text_encoder"], ids, mask, per_prompt=per_prompt,
                              cfg=guided, sharding=sharding)
        image_lat = _image_stage(self.vae, params["vae"], jnp.asarray(images), batch=batch, sharding=sharding)
        plan = _EditPlan(scheduler=sched, guided=guided, step_kwargs=tuple(sorted(step_kwargs.items())),
                         sharding=sharding)
        out = _loop_stage(self.unet, params["unet"], state, context, noise, image_lat,
                          jnp.asarray(guidance_scale, F32), jnp.asarray(image_guidance_scale, F32),
                          jax.random.fold_in(root, _KEY_STEPS), plan=plan)
        if output_type == "latent":
            return np.asarray(jax.device_get(out))
        return np.asarray(jax.device_get(_decode_stage(self.vae, params["vae"], out)))

    @staticmethod
    def _guidance(guidance_scale, image_guidance_scale) -> bool:
        """Both scales checked (finite numbers); whether the 3-way guidance runs."""
        from jaxgen.training.config_values import check_guidance

        g = check_guidance(guidance_scale, "as in diffusers, guidance_scale <= 1 applies no guidance: the "
                           "instruction and the image alone condition the samples.")
        ig = float(image_guidance_scale)
        if ig != ig or ig in (float("inf"), float("-inf")):
            raise ConfigError(f"image_guidance_scale={image_guidance_scale!r} must be a finite number (>= 1; "
                              "1.5 is diffusers' default).")
        if g > 1.0 and ig < 1.0:
            warnings.warn(f"image_guidance_scale={ig:g} < 1 switches all guidance off, guidance_scale={g:g} "
                          "included (diffusers' rule); use image_guidance_scale >= 1 to guide.", UserWarning,
                          stacklevel=3)
        return guidance_active(g, ig)

    # The inherited calls would feed the 8-channel U-Net 4 (or 9) channels: refused.
    def img2img(self, *args, **kwargs):
        raise ConfigError("an InstructPix2Pix U-Net cannot run image-to-image; call the pipeline: "
                          "pipe(instruction, image).")

    def inpaint(self, *args, **kwargs):
        raise ConfigError("an InstructPix2Pix U-Net cannot run inpainting; call the pipeline: "
                          "pipe(instruction, image).")
