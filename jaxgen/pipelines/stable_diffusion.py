"""Stable Diffusion (1.x / 2.x layout): text-to-image, image-to-image and inpainting, each call one
compiled program, numerically diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline.

    pipe = StableDiffusionPipeline.from_pretrained(folder)       # diffusers layout, model_index.json
    images = pipe("a red circle", num_inference_steps=50, guidance_scale=7.5, seed=0)
    images = pipe.img2img("a red circle", image, strength=0.75)
    images = pipe.inpaint("a red circle", image, mask_image)
    # images: float32 numpy [B, H, W, 3] in [0, 1] (diffusers' output_type="np")

What one call does (the parts diffusers' results depend on, reproduced here):

* Text: the tokenizer of ``tokenizer/`` (its pad token and model_max_length) pads every prompt to
  77 ids; the text encoder runs without an attention mask unless ``text_encoder/config.json``
  says ``use_attention_mask: true``; all 77 hidden states are the cross-attention context.
  ``encode_prompts`` is that computation on its own (the latent-diffusion task builds its
  training context table with it, so training and sampling condition the U-Net identically).
  Classifier-free guidance (guidance_scale > 1) encodes the negative prompts (default "") and
  runs the U-Net on [uncond; cond] as one batch; guidance_scale <= 1 runs the conditional pass
  only. ``guidance_rescale`` > 0 rescales the guided output to the conditional output's standard
  deviation (Lin et al. 2023, diffusers' rescale_noise_cfg, unbiased std).
* Latents: unit Gaussian noise (``latents=`` or drawn from ``seed``) times the scheduler's
  ``init_noise_sigma``; the loop over the scheduler's ladder is ``jaxgen.diffusion.sampling.
  sample_loop`` (one ``lax.scan``); the VAE decodes ``latents / scaling_factor + shift_factor``
  and images are ``clip(x / 2 + 0.5, 0, 1)``.
* Image-to-image: the image (float [0, 1], NHWC) goes to [-1, 1], the VAE posterior is sampled
  (mean + std * image_noise) and scaled by ``scaling_factor``; with n steps and ``strength`` s the
  loop starts at ladder index ``(n - min(int(n s), n)) * scheduler.order`` from
  ``scheduler.add_noise(image_latents, noise, t_start)``.
* Inpainting: the mask (1 = repaint) is binarised at 0.5 and downsampled by nearest neighbour
  (every f-th pixel, f the VAE factor); the masked image is ``image * (mask < 0.5)`` in [-1, 1].
  A 9-channel U-Net gets [latents, mask, masked-image latents] on the channel axis; a 4-channel
  U-Net gets the known region pasted back after every step, noised to the next timestep
  (``(1 - m) add_noise(image_latents, noise, t_next) + m latents``; the clean latents after the
  last step). strength 1 starts from pure noise, strength < 1 from the noised image latents.

All randomness enters as arrays so a result can be reproduced (and compared with diffusers):
``latents`` / ``noise`` (the diffusion noise), ``image_noise`` and ``masked_image_noise`` (the
VAE posterior draws). Whatever is not given is drawn from ``jax.random.key(seed)`` (or from
``seed`` itself when it is a typed jax.random key), one ``fold_in`` per purpose; stochastic
schedulers take their per-step noise from the same root (``fold_in(root, 3)``).

Compilation: a call runs up to four compiled programs: the text encoder (per prompt batch), the
VAE encoder (image inputs, per image shape), the denoising loop with guidance (one lax.scan; per
shape, scheduler, step count, strength start and on/off switches: guidance, rescale, inpainting
mode) and the VAE decoder (per latent shape). They are module-level jits with the modules as
static arguments, so pipelines with equal configs share them, and switching the scheduler or the
step count recompiles only the loop. A second call with the same shapes and options compiles
nothing (``StableDiffusionPipeline.trace_counts()`` counts the traces). Guidance scale and
rescale, prompts, images and noise are arrays: changing them does not recompile. With a ``mesh``,
the parameters are replicated and the image batch is sharded over ``batch_axis``. Subclasses add
per-step U-Net inputs with a ``LoopControl`` hook (jaxgen/pipelines/controlnet.py: ControlNets).

Deliberate differences from diffusers: prompts are the only text input (no prompt_embeds, no
clip_skip, no call-time LoRA scale: LoRA weights are set with set_adapters / fuse_lora, see
jaxgen/lora.py; no IP-Adapter); images and masks must already have the output size
(diffusers resizes them: resize first); a single negative prompt applies to every prompt
(diffusers raises for batches); with one input image per prompt and num_images_per_prompt > 1,
image i stays with prompt i (diffusers tiles the images, pairing image 0 with prompt 1);
image latents use ``shift_factor`` when the VAE has one (SD 1/2 VAEs have none, so it makes no
difference there); no safety checker.
"""
from __future__ import annotations

import abc
import collections
import dataclasses
import functools
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.compile_cache import enable_compilation_cache
from jaxgen.convert.config import read_json
from jaxgen.convert.pretrained import load_pretrained
from jaxgen.diffusion.sampling import sample_loop
from jaxgen.diffusion.schedulers import scheduler_from_config
from jaxgen.diffusion.schedulers.base import SCHEDULER_CONFIG_NAME, Scheduler
from jaxgen.errors import ConfigError, DataError
from jaxgen.lora import LoraLoaderMixin, materialize
from jaxgen.tokenizer import CLIPTokenizer, load_tokenizer

log = logging.getLogger(__name__)

F32 = jnp.float32
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                    "StableDiffusionInpaintPipeline")
REQUIRED = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
            "tokenizer": None, "scheduler": None}
# components a diffusers SD folder may name that jaxgen does not run (with why)
NOT_RUN = {"safety_checker": "jaxgen runs no safety checker",
           "feature_extractor": "it only feeds the safety checker / image encoder",
           "image_encoder": "IP-Adapter image prompts are not implemented"}
# one fold_in per purpose of the call's root key
_KEY_LATENTS, _KEY_IMAGE, _KEY_MASKED, _KEY_STEPS = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------------
# static description of one compiled program
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    """What changes the denoising program (with the input shapes): its static argument."""

    scheduler: Scheduler
    start_index: int                  # first ladder index the loop runs
    from_image: bool                  # start from add_noise(image latents) (else noise * sigma)
    cfg: bool                         # classifier-free guidance (two U-Net passes per step)
    rescale: bool                     # guidance_rescale > 0
    blend: bool                       # 4-channel inpainting: paste the known region back
    concat_mask: bool                 # 9-channel inpainting U-Net
    step_kwargs: tuple                # scheduler.step options, as sorted (name, value) pairs
    sharding: Any                     # NamedSharding of the batch axis, or None
    control: LoopControl | None = None   # extra U-Net inputs per step (ControlNet residuals)


class LoopControl(abc.ABC):
    """A hook of the denoising loop (static: hashable, part of the compiled program's key) that
    adds keyword arguments to every U-Net call, e.g. ControlNet residuals.

    ``unet_kwargs(inputs, x_in, t, i, context, cfg)`` runs inside the compiled loop:
      inputs: the call's ``control_inputs`` pytree (arrays; changing them does not recompile);
      x_in: the scaled latents [B, h, w, C] (before any inpainting channels); t: [] timestep;
      i: int32 [] ladder index; context: {"cond": [B, L, D](, "uncond": [B, L, D])};
      cfg: whether the U-Net runs on [uncond; cond] (batch 2B).
    Returns keyword arguments of ``UNet2DConditionModel.__call__`` for that batch (B or 2B).
    """

    @abc.abstractmethod
    def unet_kwargs(self, inputs, x_in, t, i, context, cfg: bool) -> dict[str, Any]:
        """The extra U-Net keyword arguments of one step (see the class docstring)."""

    def unet_input(self, inputs, x_in, t, i, context) -> jax.Array:
        """The U-Net's sample of one step, [B, h, w, C'] (called after ``unet_kwargs``, before
        guidance doubles the batch): x_in unchanged by default; the upscaler concatenates its
        noised low-res image on the channel axis (jaxgen.pipelines.upscale)."""
        return x_in


class _PasteKnownRegion:
    """A scheduler whose step also pastes the known region back (inpainting with a 4-channel
    U-Net): after the step at ladder index i, x <- (1 - m) add_noise(x0, noise, t[i+1]) + m x,
    and (1 - m) x0 + m x after the last step. Everything else is the wrapped scheduler's.

    image_latents, noise: [B, h, w, C]; mask: [B, h, w, 1] with 1 = generate, 0 = keep.
    """

    def __init__(self, inner: Scheduler, image_latents, noise, mask):
        self.inner, self.image_latents, self.noise, self.mask = inner, image_latents, noise, mask

    def __getattr__(self, name):           # only called for names not set in __init__
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def step(self, state, model_output, i, sample, noise=None, **kwargs):
        x, state = self.inner.step(state, model_output, i, sample, noise=noise, **kwargs)
        n = state.timesteps.shape[0]
        nxt = jnp.minimum(i + 1, n - 1)
        noised = self.inner.add_noise(self.image_latents, self.noise, state.timesteps[nxt], state=state)
        known = jnp.where(i + 1 < n, noised, self.image_latents).astype(x.dtype)
        return (1 - self.mask) * known + self.mask * x, state


def rescale_guidance(guided: jax.Array, cond: jax.Array, rescale: jax.Array) -> jax.Array:
    """Guidance rescale: mix the guided output with itself rescaled to the conditional output's
    per-example standard deviation (unbiased, over all non-batch axes).
    guided, cond: [B, ...]; rescale: [] in [0, 1] (0 = guided unchanged)."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    return rescale * (guided * (std_cond / std_guided)) + (1 - rescale) * guided


def root_key(seed) -> jax.Array:
    """The root key of one pipeline call: ``jax.random.key(seed)`` for an int seed, or ``seed``
    itself when it already is a typed key (e.g. a ``fold_in`` of a caller's own root)."""
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    return jax.random.key(seed)


def prompt_context(text_encoder, params, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The U-Net's cross-attention context of tokenised prompts (pure, jittable): the text
    encoder's ``last_hidden_state`` over every position, as diffusers' StableDiffusionPipeline.

    text_encoder: a CLIPTextModel module; params: its parameter tree ({"text_model": ...});
    ids: int32 [N, L] (L = 77, padded by the tokenizer); mask: int32 [N, L] or None (no mask,
    the default of SD 1.x / 2.x text encoders). Returns [N, L, D] in the encoder's dtype.
    """
    return text_encoder.apply({"params": params}, ids, mask).last_hidden_state


def encode_prompts(text_encoder, params, tokenizer: CLIPTokenizer, prompts: str | Sequence[str], *,
                   use_attention_mask: bool = False, batch_size: int = 256) -> np.ndarray:
    """The cross-attention context of each prompt, float32 [N, L, D] as host NumPy: the
    tokenizer's ids (padded to its model_max_length, 77) through ``prompt_context``, in jitted
    chunks of at most ``batch_size`` prompts. This is how the pipeline conditions its U-Net
    (``StableDiffusionPipeline.encode_prompt`` calls it with the pipeline's parts), and how the
    latent-diffusion task builds its training context table.

    prompts: one str or N str (the empty string is the unconditional prompt of classifier-free
    guidance). use_attention_mask: pass the tokenizer's attention mask (text encoders whose
    config says ``use_attention_mask: true``); otherwise every position is attended (SD 1.x / 2.x).
    """
    from jaxgen.data.chunks import map_chunked

    ids, mask = tokenizer.encode(as_texts(prompts, "prompts"), return_attention_mask=True)

    def run(ids_chunk, mask_chunk):
        return _context_stage(text_encoder, params, ids_chunk, mask_chunk if use_attention_mask else None)

    return map_chunked(run, [np.asarray(ids), np.asarray(mask)], int(batch_size))


def model_dtype_options(dtype) -> dict:
    """load_pretrained's keyword arguments for a pipeline's ``dtype`` (None: float32 weights and
    compute; bfloat16 / float16: weights held and computed in it). Another dtype is a ConfigError."""
    if dtype is None:
        return {}
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={dtype!r}: a pipeline runs in float32 (None), jnp.bfloat16 or jnp.float16.")
    d = jnp.dtype(name)
    return {"dtype": d, "compute_dtype": d}


# ------------------------------------------------------------------------------------------------
# host-side input checks
# ------------------------------------------------------------------------------------------------
def as_texts(value, what: str) -> list[str]:
    """One string or a non-empty list of strings -> a list of strings (else a TypeError naming ``what``)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{what} must be a string or a non-empty list of strings, got {value!r}.")


def as_images(image, what: str) -> np.ndarray:
    """[N, H, W, 3] or [H, W, 3], float in [0, 1] or uint8 -> float32 [N, H, W, 3] in [0, 1]."""
    x = np.asarray(image)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{what}: expected NHWC RGB images [N, H, W, 3] (or one [H, W, 3]), got shape "
                        f"{x.shape}; transpose NCHW arrays with x.transpose(0, 2, 3, 1).")
    if x.size == 0:
        raise DataError(f"{what}: got no pixels (shape {x.shape}); pass at least one image of at least 1x1.")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{what}: expected float images in [0, 1] or uint8, got dtype {x.dtype}.")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{what}: {int((~np.isfinite(x)).sum())} NaN/Inf value(s); images must be finite "
                        "floats in [0, 1] or uint8.")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{what}: float images must lie in [0, 1] (pipeline convention), got values in "
                        f"[{lo:.3g}, {hi:.3g}]; map [-1, 1] images with (x + 1) / 2.")
    return x


def _as_masks(mask, what: str) -> np.ndarray:
    """[N, H, W, 1], [N, H, W], [H, W, 1] or [H, W]; bool, uint8 or float in [0, 1]
    -> float32 [N, H, W, 1] of 0 / 1 (1 = repaint), binarised at 0.5 as diffusers does."""
    m = np.asarray(mask)
    if m.dtype == np.bool_:
        m = m.astype(np.float32)
    elif m.dtype == np.uint8:
        m = m.astype(np.float32) / 255.0
    elif not np.issubdtype(m.dtype, np.floating):
        raise DataError(f"{what}: expected a float mask in [0, 1], bool or uint8, got dtype {m.dtype}.")
    elif not np.isfinite(m).all():
        raise DataError(f"{what}: {int((~np.isfinite(m)).sum())} NaN/Inf value(s); a float mask holds finite "
                        "values in [0, 1] (1 = repaint).")
    if m.ndim == 2:                          # [H, W]
        m = m[None, :, :, None]
    elif m.ndim == 3:                        # [H, W, 1] or [N, H, W]
        m = m[None] if m.shape[-1] == 1 else m[..., None]
    if m.ndim != 4 or m.shape[-1] != 1 or m.size == 0:
        raise DataError(f"{what}: expected a single-channel mask [N, H, W, 1], [N, H, W] or [H, W] with at "
                        f"least one pixel, got shape {np.asarray(mask).shape}.")
    return (m >= 0.5).astype(np.float32)


def _expand(x: jax.Array, batch: int) -> jax.Array:
    """[N, ...] -> [batch, ...]: N == batch unchanged, N == 1 broadcast, else each row repeated
    batch / N times (row i serves the i-th prompt's images)."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return jnp.broadcast_to(x, (batch,) + x.shape[1:])
    return jnp.repeat(x, batch // x.shape[0], axis=0)


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------
class StableDiffusionPipeline(LoraLoaderMixin):
    """Stable Diffusion with a UNet2DConditionModel, an AutoencoderKL, a CLIPTextModel, CLIP's
    tokenizer and any jaxgen scheduler.

    Calls: ``pipe(prompt, ...)`` (text-to-image), ``pipe.img2img(prompt, image, ...)``,
    ``pipe.inpaint(prompt, image, mask_image, ...)``; each returns float32 numpy
    [B, H, W, 3] in [0, 1] with B = number of prompts * num_images_per_prompt (or the latents
    [B, H/f, W/f, C] with output_type="latent").

    Attributes: unet, vae, text_encoder (Linen modules), params ({"unet", "vae", "text_encoder"}
    parameter trees), tokenizer, scheduler (the default jaxgen scheduler), scheduler_config (the
    folder's scheduler_config.json dict, for switching algorithms by name), use_attention_mask,
    vae_scale_factor, mesh / batch_axis.
    """

    PARAM_KEYS: tuple[str, ...] = ("unet", "vae", "text_encoder")    # the entries of ``params``

    def __init__(self, unet, vae, text_encoder, params: Mapping[str, Any], tokenizer: CLIPTokenizer,
                 scheduler: Scheduler, *, scheduler_config: Mapping[str, Any] | None = None,
                 use_attention_mask: bool = False, mesh: jax.sharding.Mesh | None = None,
                 batch_axis: str | None = None):
        """Assemble from loaded parts (``from_pretrained`` does this from a folder).

        params: {"unet": ..., "vae": ..., "text_encoder": ...}, each the module's ``params`` tree.
        mesh, batch_axis: shard the image batch over ``mesh.axis_names[batch_axis]`` (default the
            mesh's first axis); parameters are replicated over the mesh.
        """
        enable_compilation_cache()               # jaxgen/compile_cache.py
        missing = set(self.PARAM_KEYS) - set(params)
        if missing:
            raise ConfigError(f"{type(self).__name__}: params lacks {sorted(missing)}; pass a dict with "
                              f"{', '.join(self.PARAM_KEYS)}.")
        self._check_unet_channels(unet, vae)
        if getattr(unet, "time_cond_proj_dim", None) is not None:
            raise ConfigError("StableDiffusionPipeline: this U-Net has time_cond_proj_dim set (a "
                              "guidance-embedded / LCM U-Net); jaxgen's Stable Diffusion pipeline "
                              "implements classifier-free guidance only. Use a U-Net without it.")
        if (isinstance(unet.cross_attention_dim, int) and unet.encoder_hid_dim is None
                and unet.cross_attention_dim != text_encoder.hidden_size):
            raise ConfigError(f"StableDiffusionPipeline: the U-Net's cross_attention_dim="
                              f"{unet.cross_attention_dim} differs from the text encoder's hidden_size="
                              f"{text_encoder.hidden_size}; the folder mixes incompatible models.")
        if not isinstance(scheduler, Scheduler):
            raise TypeError(f"scheduler must be a jaxgen Scheduler, got {type(scheduler).__name__}.")
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.scheduler_config = (dict(scheduler_config) if scheduler_config is not None
                                 else scheduler.to_config())
        self.use_attention_mask = bool(use_attention_mask)
        self.vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)
        self.mesh, self.batch_axis, self._batch_sharding = mesh, None, None
        params = {k: params[k] for k in self.PARAM_KEYS}
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            self.batch_axis = batch_axis if batch_axis is not None else mesh.axis_names[0]
            if self.batch_axis not in mesh.axis_names:
                raise ConfigError(f"batch_axis={self.batch_axis!r} is not an axis of the mesh "
                                  f"{tuple(mesh.axis_names)}; pass one of them.")
            self._batch_sharding = NamedSharding(mesh, PartitionSpec(self.batch_axis))
            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.params = params

    def _check_unet_channels(self, unet, vae) -> None:
        """ConfigError unless the U-Net's in_channels suit this pipeline's calls (a subclass feeding
        the U-Net other channels, e.g. InstructPix2Pix's 8, overrides it)."""
        if unet.in_channels not in (4, 9) and unet.in_channels != vae.latent_channels:
            raise ConfigError(f"StableDiffusionPipeline: the U-Net takes {unet.in_channels} channels; "
                              f"expected the VAE's {vae.latent_channels} latent channels, or 9 "
                              "(an inpainting U-Net).")

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                        batch_axis: str | None = None, allow_pickle: bool = False, dtype=None):
        """Load a diffusers Stable Diffusion folder (``save_pretrained`` layout).

        folder: holds model_index.json and unet/, vae/, text_encoder/, tokenizer/, scheduler/.
            Components saved as null (safety_checker, feature_extractor) are skipped; a non-null
            safety checker or feature extractor is not run (logged); any other component (e.g. a
            second text encoder) is a ConfigError: this is not a Stable Diffusion 1.x / 2.x folder.
        mesh, batch_axis: see ``__init__``. allow_pickle: read .bin weights (see load_pretrained).
        dtype: None (float32), jnp.bfloat16 or jnp.float16: the models' weights are held and
            computed in that dtype (as diffusers' ``torch_dtype=``); the scheduler's arithmetic,
            the latents between steps and the returned images stay float32.
        """
        parts, _ = cls.load_components(folder, allow_pickle=allow_pickle, dtype=dtype)
        return cls(**parts, mesh=mesh, batch_axis=batch_axis)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config, *, tokenizer=None, extract_ema: bool = False,
                         allow_pickle: bool = False, mesh: jax.sharding.Mesh | None = None,
                         batch_axis: str | None = None):
        """Load an original (CompVis / Stability) single-file SD 1.x / 2.x checkpoint; ``config``
        (a diffusers SD folder or a dict of component configs) gives the architectures, tokenizer
        and scheduler. See jaxgen.convert.single_file.load_single_file."""
        from jaxgen.convert.single_file import load_single_file

        parts = load_single_file(path, config, tokenizer=tokenizer, extract_ema=extract_ema,
                                 allow_pickle=allow_pickle)
        return cls(**parts, mesh=mesh, batch_axis=batch_axis)

    def save_single_file(self, path: str | os.PathLike, *, text_encoder_layout: str = "auto", dtype=None) -> str:
        """Write the U-Net, VAE and text encoder as one original-layout .safetensors file
        (see jaxgen.convert.single_file.save_single_file). Returns the path."""
        from jaxgen.convert.single_file import save_single_file

        return save_single_file(self, path, text_encoder_layout=text_encoder_layout, dtype=dtype)

    @staticmethod
    def load_components(folder: str | os.PathLike, *, pipeline_classes: Sequence[str] = PIPELINE_CLASSES,
                        others: Sequence[str] = (), allow_pickle: bool = False, dtype=None) -> tuple[dict, dict]:
        """The Stable Diffusion parts of a diffusers pipeline folder, checked against its
        model_index.json: (keyword arguments of ``__init__`` (unet, vae, text_encoder, params,
        tokenizer, scheduler, scheduler_config, use_attention_mask), the model_index dict).

        pipeline_classes: the ``_class_name`` values accepted; others: components the caller loads
        itself (e.g. "controlnet"), skipped here. Any other unknown component is a ConfigError.
        dtype: the models' weight and compute dtype (``model_dtype_options``; None: float32).
        """
        folder = os.fspath(folder)
        index = read_json(os.path.join(folder, "model_index.json"))
        name = index.get("_class_name")
        if name not in pipeline_classes:
            raise ConfigError(f"{folder}/model_index.json describes a {name!r}; this pipeline loads "
                              f"{', '.join(pipeline_classes)} folders.")
        for comp, spec in index.items():
            if comp.startswith("_") or not isinstance(spec, (list, tuple)):
                continue              # metadata and plain options (requires_safety_checker)
            if comp in REQUIRED or comp in others:
                continue
            if comp in NOT_RUN:
                if spec[0] is not None:
                    log.warning("%s: component %r (%s) is not run: %s.", folder, comp, spec[1], NOT_RUN[comp])
                continue
            raise ConfigError(f"{folder}: component {comp!r} ({spec}) is not part of a Stable Diffusion "
                              f"1.x / 2.x pipeline ({name}), which this pipeline loads.")
        for comp, expected in REQUIRED.items():
            spec = index.get(comp)
            if not isinstance(spec, (list, tuple)) or spec[0] is None:
                raise ConfigError(f"{folder}/model_index.json has no {comp!r} component; a Stable "
                                  "Diffusion folder needs unet, vae, text_encoder, tokenizer and scheduler.")
            if expected is not None and spec[1] != expected:
                raise ConfigError(f"{folder}: {comp} is a {spec[1]}; this pipeline takes a {expected}.")
        kw = dict(allow_pickle=allow_pickle, **model_dtype_options(dtype))
        unet, unet_p = load_pretrained(os.path.join(folder, "unet"), **kw)
        vae, vae_p = load_pretrained(os.path.join(folder, "vae"), **kw)
        te_dir = os.path.join(folder, "text_encoder")
        text, text_p = load_pretrained(te_dir, **kw)
        use_mask = bool(read_json(os.path.join(te_dir, "config.json")).get("use_attention_mask", False))
        tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
        sched_cfg = read_json(os.path.join(folder, "scheduler", SCHEDULER_CONFIG_NAME))
        parts = dict(unet=unet, vae=vae, text_encoder=text,
                     params={"unet": unet_p, "vae": vae_p, "text_encoder": text_p}, tokenizer=tokenizer,
                     scheduler=scheduler_from_config(sched_cfg), scheduler_config=sched_cfg,
                     use_attention_mask=use_mask)
        return parts, index

    # -- public calls -----------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, seed: int = 0, latents=None, scheduler=None, *,
                 num_images_per_prompt: int = 1, guidance_rescale: float = 0.0, eta: float = 0.0,
                 output_type: str = "np") -> np.ndarray:
        """Text-to-image.

        prompt: a string or P strings; negative_prompt: None (the empty prompt), one string for
            all, or P strings; used only when guidance_scale > 1.
        height, width: pixels, multiples of vae_scale_factor; default unet.sample_size * factor.
        seed: int (or a typed jax.random key), the root of every random draw not given as an
            array; stochastic schedulers draw their per-step noise from fold_in(root, 3).
        latents: unit Gaussian noise [B, H/f, W/f, C] float (B = P * num_images_per_prompt),
            multiplied by the scheduler's init_noise_sigma (as diffusers' ``latents=``).
        scheduler: a jaxgen Scheduler, or a diffusers class name (built from this folder's
            scheduler config, as ``Cls.from_config(pipe.scheduler.config)``); None: the folder's.
        guidance_rescale: in [0, 1]; eta: DDIM's eta (DDIMScheduler only).
        output_type: "np" (images float32 [B, H, W, 3] in [0, 1]) or "latent" ([B, H/f, W/f, C]).
        """
        return self._text_to_image(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                   seed, latents, scheduler, num_images_per_prompt=num_images_per_prompt,
                                   guidance_rescale=guidance_rescale, eta=eta, output_type=output_type)

    def _text_to_image(self, prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, seed,
                       latents, scheduler, *, num_images_per_prompt, guidance_rescale, eta, output_type,
                       control: LoopControl | None = None, control_inputs=None) -> np.ndarray:
        """``__call__``'s work; ``control`` / ``control_inputs``: see ``_run``."""
        height, width = self._size(height, width)
        prompts = as_texts(prompt, "prompt")
        batch = len(prompts) * self._per_prompt(num_images_per_prompt)
        shape = (batch, height // self.vae_scale_factor, width // self.vae_scale_factor,
                 self.vae.latent_channels)
        root = root_key(seed)
        latents = self._noise(latents, root, _KEY_LATENTS, shape, "latents")
        return self._run("text", prompts, negative_prompt, num_inference_steps, guidance_scale,
                         guidance_rescale, scheduler, eta, num_images_per_prompt, output_type, root,
                         strength=1.0, inputs={"noise": latents}, control=control, control_inputs=control_inputs)

    def img2img(self, prompt: str | Sequence[str], image, strength: float = 0.8,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, seed: int = 0, noise=None, image_noise=None,
                scheduler=None, *, num_images_per_prompt: int = 1, guidance_rescale: float = 0.0,
                eta: float = 0.0, output_type: str = "np") -> np.ndarray:
        """Image-to-image (diffusers' StableDiffusionImg2ImgPipeline).

        image: float [N, H, W, 3] in [0, 1] (or uint8, or one [H, W, 3]); H, W multiples of
            vae_scale_factor; N = 1 (shared), P (one per prompt) or B (one per output image).
        strength: in (0, 1]; the loop runs the last min(int(n strength), n) of n steps.
        noise: unit Gaussian [B, H/f, W/f, C] added to the image latents at the start timestep.
        image_noise: unit Gaussian [N, H/f, W/f, C], the VAE posterior draw
            (latents = scaling_factor * (mean + std * image_noise)).
        Other arguments as ``__call__``. Returns [B, H, W, 3] float32 in [0, 1].
        """
        images = as_images(image, "img2img image")
        prompts = as_texts(prompt, "prompt")
        batch = len(prompts) * self._per_prompt(num_images_per_prompt)
        self._check_count(images.shape[0], len(prompts), batch, "image")
        height, width = self._size(images.shape[1], images.shape[2], what="image")
        self._check_strength(strength)
        h, w, c = height // self.vae_scale_factor, width // self.vae_scale_factor, self.vae.latent_channels
        root = root_key(seed)
        inputs = {"image": jnp.asarray(images),
                  "noise": self._noise(noise, root, _KEY_LATENTS, (batch, h, w, c), "noise"),
                  "image_noise": self._noise(image_noise, root, _KEY_IMAGE, (images.shape[0], h, w, c),
                                             "image_noise")}
        return self._run("image", prompts, negative_prompt, num_inference_steps, guidance_scale,
                         guidance_rescale, scheduler, eta, num_images_per_prompt, output_type, root,
                         strength=strength, inputs=inputs)

    def inpaint(self, prompt: str | Sequence[str], image, mask_image, strength: float = 1.0,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, seed: int = 0, noise=None, image_noise=None,
                masked_image_noise=None, scheduler=None, *, num_images_per_prompt: int = 1,
                guidance_rescale: float = 0.0, eta: float = 0.0, output_type: str = "np") -> np.ndarray:
        """Inpainting (diffusers' StableDiffusionInpaintPipeline), with a 9-channel inpainting
        U-Net or, for an ordinary 4-channel U-Net, by pasting the known region back every step.

        image: float [N, H, W, 3] in [0, 1] (or uint8); mask_image: [N or 1, H, W(, 1)] float in
            [0, 1] / bool / uint8, 1 (>= 0.5) = repaint, 0 = keep. N as in ``img2img``.
        strength: in (0, 1]; 1 starts from pure noise (the image only conditions), less starts
            from the noised image latents as image-to-image does.
        noise: unit Gaussian [B, H/f, W/f, C] (the initial latents at strength 1, and the noise
            of the pasted-back region); image_noise / masked_image_noise: [N, H/f, W/f, C], the
            VAE posterior draws for the image and the masked image.
        Other arguments as ``__call__``. Returns [B, H, W, 3] float32 in [0, 1].
        """
        images = as_images(image, "inpaint image")
        masks = _as_masks(mask_image, "inpaint mask_image")
        if masks.shape[1:3] != images.shape[1:3]:
            raise DataError(f"inpaint: mask_image is {masks.shape[1]}x{masks.shape[2]} but the image is "
                            f"{images.shape[1]}x{images.shape[2]}; give them the same size.")
        n_img = max(images.shape[0], masks.shape[0])
        if masks.shape[0] not in (1, n_img) or images.shape[0] not in (1, n_img):
            raise DataError(f"inpaint: {images.shape[0]} images and {masks.shape[0]} masks; pass as many "
                            "masks as images, or one of either for all.")
        images = np.broadcast_to(images, (n_img,) + images.shape[1:])
        masks = np.broadcast_to(masks, (n_img,) + masks.shape[1:])
        prompts = as_texts(prompt, "prompt")
        batch = len(prompts) * self._per_prompt(num_images_per_prompt)
        self._check_count(n_img, len(prompts), batch, "image")
        height, width = self._size(images.shape[1], images.shape[2], what="image")
        self._check_strength(strength)
        h, w, c = height // self.vae_scale_factor, width // self.vae_scale_factor, self.vae.latent_channels
        if self.unet.in_channels == 9 and c != 4:
            raise ConfigError(f"inpaint: a 9-channel U-Net takes 4 latent + 1 mask + 4 masked-image "
                              f"channels, but the VAE has {c} latent channels.")
        root = root_key(seed)
        inputs = {"image": jnp.asarray(images), "mask": jnp.asarray(masks),
                  "noise": self._noise(noise, root, _KEY_LATENTS, (batch, h, w, c), "noise"),
                  "image_noise": self._noise(image_noise, root, _KEY_IMAGE, (n_img, h, w, c), "image_noise"),
                  "masked_image_noise": self._noise(masked_image_noise, root, _KEY_MASKED, (n_img, h, w, c),
                                                    "masked_image_noise")}
        return self._run("inpaint", prompts, negative_prompt, num_inference_steps, guidance_scale,
                         guidance_rescale, scheduler, eta, num_images_per_prompt, output_type, root,
                         strength=strength, inputs=inputs)

    def prompt_to_prompt(self, prompt, edit_prompt, **options):
        """Prompt-to-Prompt editing (arXiv 2208.01626): (source_images, edited_images) float32
        [P, H, W, 3] in [0, 1]; mode="replace"|"refine"|"reweight", cross_replace_steps=0.8,
        self_replace_steps=0.4, equalizer=None, local_blend_words=None, num_inference_steps=50,
        guidance_scale=7.5, seed=0, latents=None, scheduler=None, ... (see
        jaxgen.pipelines.prompt_to_prompt.prompt_to_prompt)."""
        from jaxgen.pipelines.prompt_to_prompt import prompt_to_prompt

        return prompt_to_prompt(self, prompt, edit_prompt, **options)

    def attention_maps(self, prompt, **options):
        """Text-to-image with per-token cross-attention maps: (images [B, H, W, 3], maps float32
        [B, h, w, 77], tokens) (see jaxgen.pipelines.prompt_to_prompt.attention_maps)."""
        from jaxgen.pipelines.prompt_to_prompt import attention_maps

        return attention_maps(self, prompt, **options)

    # -- host-side preparation ----------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[str]) -> np.ndarray:
        """The U-Net's context of each prompt, float32 [N, 77, D]: ``encode_prompts`` with this
        pipeline's text encoder, tokenizer and attention-mask setting."""
        return encode_prompts(self.text_encoder, self.lora_call_params()["text_encoder"], self.tokenizer, prompt,
                              use_attention_mask=self.use_attention_mask)

    def get_scheduler(self, scheduler=None) -> Scheduler:
        """None -> the folder's scheduler; a class name -> that algorithm from the folder's config;
        a jaxgen Scheduler -> itself."""
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, str):
            return scheduler_from_config(self.scheduler_config, class_name=scheduler)
        if isinstance(scheduler, Scheduler):
            return scheduler
        raise TypeError(f"scheduler must be a jaxgen Scheduler, a diffusers scheduler class name or None, "
                        f"got {type(scheduler).__name__}; build one with "
                        "jaxgen.scheduler_from_config(cfg) (a torch scheduler cannot run here).")

    def _size(self, height, width, what: str = "height/width") -> tuple[int, int]:
        f = self.vae_scale_factor
        if height is None or width is None:
            size = self.unet.sample_size
            if size is None:
                raise ConfigError("the U-Net config has no sample_size; pass height= and width=.")
            sh, sw = (size, size) if isinstance(size, int) else tuple(size)
            height = sh * f if height is None else height
            width = sw * f if width is None else width
        height, width = int(height), int(width)
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"{what}: {height}x{width} pixels; height and width must be positive "
                             f"multiples of {f} (the VAE's downsampling factor), e.g. "
                             f"{max(f, height // f * f)}x{max(f, width // f * f)}.")
        return height, width

    @staticmethod
    def _per_prompt(n) -> int:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_images_per_prompt={n!r}; it must be an int >= 1.")
        return int(n)

    @staticmethod
    def _check_count(n: int, prompts: int, batch: int, what: str) -> None:
        if n not in (1, prompts, batch):
            raise DataError(f"{n} {what}s for {prompts} prompts ({batch} images); pass one {what} for all, "
                            f"one per prompt, or one per output image.")

    @staticmethod
    def _check_strength(strength) -> None:
        if not 0 < float(strength) <= 1:
            raise ValueError(f"strength={strength}; it must lie in (0, 1] (1 = ignore the image's "
                             "content at the start, small = stay close to it).")

    def _noise(self, given, root, purpose: int, shape: tuple, what: str) -> jax.Array:
        """The given unit-Gaussian array (checked against ``shape``) or a draw from fold_in(root)."""
        if given is None:
            return jax.random.normal(jax.random.fold_in(root, purpose), shape, F32)
        x = jnp.asarray(given, F32)
        if tuple(x.shape) != tuple(shape):
            hint = (" (NHWC: transpose NCHW torch latents with .permute(0, 2, 3, 1))"
                    if x.ndim == 4 and x.shape[1] == shape[3] else "")
            raise DataError(f"{what} has shape {tuple(x.shape)}; this call needs {tuple(shape)}{hint}.")
        return x

    def _tokenize_prompts(self, prompts: list[str], negative, cfg: bool):
        """ids (and attention masks) [P, L] or, with guidance, [2P, L]: negatives first."""
        texts = list(prompts)
        if cfg:
            if negative is None:
                neg = [""] * len(prompts)
            elif isinstance(negative, str):
                neg = [negative] * len(prompts)
            else:
                neg = as_texts(negative, "negative_prompt")
                if len(neg) != len(prompts):
                    raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts; pass one "
                                     "per prompt, or one string for all.")
            texts = neg + texts
        ids, mask = self.tokenizer.encode(texts, return_attention_mask=True)
        return jnp.asarray(ids), (jnp.asarray(mask) if self.use_attention_mask else None)

    def _run(self, mode, prompts, negative, steps, guidance_scale, guidance_rescale, scheduler, eta,
             per_prompt, output_type, root, *, strength, inputs, control: LoopControl | None = None,
             control_inputs=None):
        """One call: text, image, loop and decode stages. control (static, hashable) adds keyword
        arguments to every U-Net call of the loop from control_inputs (a pytree of arrays), e.g. a
        ControlNet's residuals (jaxgen.pipelines.controlnet)."""
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type={output_type!r}; use 'np' (images) or 'latent'.")
        sched = self.get_scheduler(scheduler)
        state = sched.set_timesteps(steps)
        step_kwargs = {}
        if eta:
            if "eta" not in _step_params(sched):
                raise ValueError(f"eta={eta} applies to DDIMScheduler only; {type(sched).__name__} has "
                                 "no eta. Leave eta at 0.")
            step_kwargs["eta"] = float(eta)
        # diffusers' get_timesteps: the last min(int(n s), n) steps, in ladder entries of `order`
        n = int(steps)
        init = min(int(n * float(strength)), n)
        if init < 1:
            raise ValueError(f"strength={strength} with num_inference_steps={n} leaves no step to run "
                             f"(int(n * strength) = 0); raise strength or the number of steps.")
        start = (n - init) * sched.order
        if not 0 <= start < int(state.timesteps.shape[0]):
            raise ValueError(f"strength={strength} starts at ladder index {start}, outside the "
                             f"{int(state.timesteps.shape[0])} entries of {type(sched).__name__}.")
        from_image = mode == "image" or (mode == "inpaint" and float(strength) < 1.0)
        blend = mode == "inpaint" and self.unet.in_channels != 9
        concat_mask = mode == "inpaint" and self.unet.in_channels == 9
        from jaxgen.training.config_values import check_guidance

        cfg = check_guidance(guidance_scale, "as in diffusers, guidance_scale <= 1 applies no classifier-free "
                             "guidance: the prompt alone conditions the samples (guidance above 1 "
                             "strengthens it).") > 1.0
        noise = inputs["noise"]
        batch = noise.shape[0]
        sharding = self._batch_sharding
        if sharding is not None:
            size = self.mesh.shape[self.batch_axis]
            if batch % size:
                raise ValueError(f"{batch} images do not split over the {size} devices of mesh axis "
                                 f"{self.batch_axis!r}; make the batch (prompts x num_images_per_prompt) "
                                 "a multiple of it.")
            noise = jax.device_put(noise, sharding)
        params = self.lora_call_params()     # unfused LoRA adapters ride along (jaxgen/lora.py)

        ids, mask = self._tokenize_prompts(prompts, negative, cfg)
        context = _text_stage(self.text_encoder, params["text_encoder"], ids, mask,
                              per_prompt=int(per_prompt), cfg=cfg, sharding=sharding)
        image = {}
        if mode != "text":
            image = _image_stage(self.vae, params["vae"], inputs["image"], inputs["image_noise"],
                                 inputs.get("mask"), inputs.get("masked_image_noise"), batch=batch,
                                 need_image=from_image or blend, need_masked=concat_mask,
                                 factor=self.vae_scale_factor, sharding=sharding)
        plan = _Plan(scheduler=sched, start_index=start, from_image=from_image, cfg=cfg,
                     rescale=cfg and float(guidance_rescale) > 0, blend=blend, concat_mask=concat_mask,
                     step_kwargs=tuple(sorted(step_kwargs.items())), sharding=sharding, control=control)
        latents = _loop_stage(self.unet, params["unet"], state, context, noise, image,
                              jnp.asarray(guidance_scale, F32), jnp.asarray(guidance_rescale, F32),
                              jax.random.fold_in(root, _KEY_STEPS), control_inputs, plan=plan)
        if output_type == "latent":
            return np.asarray(jax.device_get(latents))
        return np.asarray(jax.device_get(_decode_stage(self.vae, params["vae"], latents)))

    @staticmethod
    def trace_counts() -> dict[str, int]:
        """How many times each compiled stage ("text", "image", "loop", "decode"; "context" for
        ``encode_prompts``) has been traced in this process, over all pipelines (a trace precedes
        every compilation)."""
        return dict(_TRACES)


# ------------------------------------------------------------------------------------------------
# the compiled stages (module-level, so pipelines with equal modules share the compiled programs)
# ------------------------------------------------------------------------------------------------
_TRACES: collections.Counter = collections.Counter()


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


@functools.partial(jax.jit, static_argnames=("text_encoder", "per_prompt", "cfg", "sharding"))
def _text_stage(text_encoder, params, ids, mask, *, per_prompt: int, cfg: bool, sharding):
    """ids (mask) int32 [P or 2P, L] -> {"cond": [B, L, D](, "uncond": [B, L, D])}, B = P per_prompt:
    every prompt's hidden states repeated per_prompt times (negatives are the first P rows)."""
    _TRACES["text"] += 1
    params = materialize(params)                                               # unfused LoRA
    hidden = prompt_context(text_encoder, params, ids, mask)                  # [P or 2P, L, D]
    hidden = jnp.repeat(hidden, per_prompt, axis=0)
    if not cfg:
        return {"cond": _constrain(hidden, sharding)}
    uncond, cond = jnp.split(hidden, 2, axis=0)
    return {"cond": _constrain(cond, sharding), "uncond": _constrain(uncond, sharding)}


@functools.partial(jax.jit, static_argnames=("text_encoder",))
def _context_stage(text_encoder, params, ids, mask):
    """ids (mask) int32 [N, L] -> float32 [N, L, D]: ``prompt_context`` for ``encode_prompts``."""
    _TRACES["context"] += 1
    params = materialize(params)                                               # unfused LoRA
    return prompt_context(text_encoder, params, ids, mask).astype(F32)


@functools.partial(jax.jit, static_argnames=("vae", "batch", "need_image", "need_masked", "factor",
                                             "sharding"))
def _image_stage(vae, params, images, image_noise, masks, masked_noise, *, batch: int, need_image: bool,
                 need_masked: bool, factor: int, sharding):
    """The image side of img2img / inpainting, expanded to the batch B.

    images: [N, H, W, 3] in [0, 1]; masks: [N, H, W, 1] in {0, 1} or None; *_noise: [N, h, w, C].
    Returns {"image": scaled posterior draw of the image [B, h, w, C] (if need_image),
             "mask": [B, h, w, 1] nearest-downsampled (every factor-th pixel; with masks),
             "masked": latents of image * (mask < 0.5) [B, h, w, C] (if need_masked)}.
    """
    _TRACES["image"] += 1
    scale, shift = vae.scaling_factor, vae.shift_factor or 0.0

    def encode(pixels, eps):                                     # pixels in [-1, 1]
        post = vae.apply({"params": params}, pixels, method="encode")
        return _expand(((post.mean + post.std * eps) - shift) * scale, batch)

    pixels = 2.0 * images - 1.0
    out = {}
    if need_image:
        out["image"] = encode(pixels, image_noise)
    if masks is not None:
        out["mask"] = _expand(masks[:, ::factor, ::factor, :], batch)
    if need_masked:
        out["masked"] = encode(pixels * (masks < 0.5), masked_noise)
    return {k: _constrain(v, sharding) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("unet", "plan"))
def _loop_stage(unet, params, state, context, noise, image, guidance_scale, guidance_rescale, step_key,
                control_inputs=None, *, plan: _Plan):
    """The denoising loop (one lax.scan over the ladder from plan.start_index) with guidance.

    context: from _text_stage; noise: [B, h, w, C] unit Gaussian; image: from _image_stage ({} for
    text-to-image); guidance_scale, guidance_rescale: [] float32; step_key: the stochastic
    schedulers' per-step noise root; control_inputs: the arrays of plan.control (or None).
    Returns the final latents [B, h, w, C] float32.
    """
    _TRACES["loop"] += 1
    params = materialize(params)                                               # unfused LoRA
    sched = plan.scheduler
    x = _constrain(noise, plan.sharding)
    if plan.from_image:
        x = sched.add_noise(image["image"], x, state.timesteps[plan.start_index], state=state)
        x = x.astype(noise.dtype)
    if plan.blend:
        sched = _PasteKnownRegion(sched, image["image"], _constrain(noise, plan.sharding), image["mask"])
    if plan.concat_mask:
        context = dict(context, extra=jnp.concatenate([image["mask"], image["masked"]], axis=-1))

    def model_fn(x_in, t, ctx, i):
        extra = ({} if plan.control is None else
                 plan.control.unet_kwargs(control_inputs, x_in, t, i, ctx, plan.cfg))
        if plan.control is not None:
            x_in = plan.control.unet_input(control_inputs, x_in, t, i, ctx)
        if "extra" in ctx:                                       # [B, h, w, C + 1 + C]
            x_in = jnp.concatenate([x_in, ctx["extra"].astype(x_in.dtype)], axis=-1)
        if not plan.cfg:
            return unet.apply({"params": params}, x_in, jnp.broadcast_to(t, (x_in.shape[0],)), ctx["cond"],
                              **extra)
        both = jnp.concatenate([x_in, x_in], axis=0)             # [2B, ...]: uncond, then cond
        out = unet.apply({"params": params}, both, jnp.broadcast_to(t, (both.shape[0],)),
                         jnp.concatenate([ctx["uncond"], ctx["cond"]], axis=0), **extra)
        out_u, out_c = jnp.split(out, 2, axis=0)
        guided = out_u + guidance_scale * (out_c - out_u)
        return rescale_guidance(guided, out_c, guidance_rescale) if plan.rescale else guided

    return sample_loop(sched, state, model_fn, x, key=step_key, cond=context,
                       start_index=plan.start_index, scale_init=not plan.from_image,
                       step_kwargs=dict(plan.step_kwargs), pass_index=True)


@functools.partial(jax.jit, static_argnames=("vae",))
def _decode_stage(vae, params, latents):
    """latents [B, h, w, C] -> images float32 [B, H, W, 3] in [0, 1]:
    decode(latents / scaling_factor + shift_factor), then clip(x / 2 + 0.5, 0, 1)."""
    _TRACES["decode"] += 1
    z = latents / vae.scaling_factor + (vae.shift_factor or 0.0)
    decoded = vae.apply({"params": params}, z, method="decode")
    return jnp.clip(decoded / 2 + 0.5, 0.0, 1.0).astype(F32)


def _step_params(scheduler: Scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """The same pipeline, called as image-to-image: ``pipe(prompt, image, strength=0.8, ...)``
    is ``StableDiffusionPipeline.img2img`` (text-to-image stays available as ``text2img``)."""

    def __call__(self, prompt, image, strength: float = 0.8, **kwargs) -> np.ndarray:
        return self.img2img(prompt, image, strength, **kwargs)

    def text2img(self, prompt, **kwargs) -> np.ndarray:
        return StableDiffusionPipeline.__call__(self, prompt, **kwargs)


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    """The same pipeline, called as inpainting: ``pipe(prompt, image, mask_image, ...)`` is
    ``StableDiffusionPipeline.inpaint`` (text-to-image stays available as ``text2img``)."""

    def __call__(self, prompt, image, mask_image, strength: float = 1.0, **kwargs) -> np.ndarray:
        return self.inpaint(prompt, image, mask_image, strength, **kwargs)

    def text2img(self, prompt, **kwargs) -> np.ndarray:
        return StableDiffusionPipeline.__call__(self, prompt, **kwargs)
