"""Text-to-video: diffusers' TextToVideoSDPipeline (ModelScope layout) with jaxgen's
UNet3DConditionModel, the denoising loop one compiled program.

    pipe = TextToVideoSDPipeline.from_pretrained(folder)          # diffusers layout, model_index.json
    frames = pipe("a red circle moving right", num_frames=16, num_inference_steps=50, guidance_scale=9.0)
    # frames: float32 numpy [B, F, H, W, 3] in [0, 1] (diffusers' output_type="np")

    pipe = TextToVideoSDPipeline(unet, vae, text_encoder, params, tokenizer, scheduler)   # in-memory parts

What one call does (what diffusers' result depends on, reproduced here):

* Text: as Stable Diffusion (``jaxgen.pipelines.stable_diffusion.encode_prompts``): 77 token ids
  per prompt, the text encoder's last hidden states as the context; with guidance_scale > 1 the
  negative prompts (default "") are encoded too and the U-Net runs on [uncond; cond].
* Latents: unit Gaussian noise [B, F, h, w, C] (``latents=``, diffusers' [B, C, F, h, w] moved to
  frames-second channels-last, or drawn from ``seed``) times the scheduler's init_noise_sigma.
  The scheduler steps on the frames folded into the batch, [(B F), h, w, C], as diffusers'
  loop does; the U-Net sees [B, F, h, w, C]. One ``lax.scan`` over the ladder
  (``jaxgen.diffusion.sampling.sample_loop``).
* Decoding: frame by frame (the (B F) frames as one VAE batch) of ``latents / scaling_factor``
  (+ shift_factor when the VAE has one; diffusers ignores it, SD-family VAEs have none), then
  ``clip(x / 2 + 0.5, 0, 1)``: diffusers' VideoProcessor.postprocess_video with output_type="np".

Randomness: whatever is not given as an array comes from ``jax.random.key(seed)``: the latents
from fold_in(root, 0), stochastic schedulers' per-step noise from fold_in(root, 3) (the purposes
StableDiffusionPipeline uses).

Compilation: the text encoder (per prompt count), the loop (per shape, scheduler, step count,
guidance on/off and scheduler options) and the decoder (per latent shape) are module-level jits
with the modules static; prompts, noise and guidance scale are arrays, so a second call with the
same shapes compiles nothing (``trace_counts()``).

Deliberate differences from diffusers: prompts are the only text input (no prompt_embeds, no
clip_skip, no LoRA scale); a single negative string applies to every prompt; no callbacks.
"""
from __future__ import annotations

import collections
import functools
import inspect
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.config import read_json
from jaxgen.convert.pretrained import load_pretrained
from jaxgen.diffusion.sampling import sample_loop
from jaxgen.diffusion.schedulers import scheduler_from_config
from jaxgen.diffusion.schedulers.base import SCHEDULER_CONFIG_NAME, Scheduler
from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.unet3d import UNet3DConditionModel
from jaxgen.pipelines.stable_diffusion import (StableDiffusionPipeline, as_texts, encode_prompts,
                                               model_dtype_options, root_key)
from jaxgen.tokenizer import CLIPTokenizer, load_tokenizer

F32 = jnp.float32
PIPELINE_CLASSES = ("TextToVideoSDPipeline",)
REQUIRED = {"unet": "UNet3DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
            "tokenizer": None, "scheduler": None}
_KEY_LATENTS, _KEY_STEPS = 0, 3          # fold_in purposes of a call's root key (as Stable Diffusion)
_TRACES: collections.Counter = collections.Counter()


class TextToVideoSDPipeline:
    """Text-to-video with a UNet3DConditionModel, an AutoencoderKL (decoding each frame), a
    CLIPTextModel, CLIP's tokenizer and any jaxgen scheduler.

    ``pipe(prompt, ...)`` returns float32 numpy [B, F, H, W, 3] in [0, 1], B = number of prompts
    (or the latents [B, F, H/f, W/f, C] with output_type="latent").

    Attributes: unet, vae, text_encoder (Linen modules), params ({"unet", "vae", "text_encoder"}),
    tokenizer, scheduler (the default), scheduler_config (for switching algorithms by name),
    use_attention_mask, vae_scale_factor f.
    """

    PARAM_KEYS: tuple[str, ...] = ("unet", "vae", "text_encoder")

    # shared with Stable Diffusion: None / a class name / a jaxgen Scheduler -> the scheduler to run
    get_scheduler = StableDiffusionPipeline.get_scheduler

    def __init__(self, unet: UNet3DConditionModel, vae, text_encoder, params: Mapping[str, Any],
                 tokenizer: CLIPTokenizer, scheduler: Scheduler, *, scheduler_config: Mapping[str, Any] | None = None,
                 use_attention_mask: bool = False):
        """Assemble from parts in memory (``from_pretrained`` does this from a folder), e.g. a
        text-to-video model trained in jaxgen.

        params: {"unet": ..., "vae": ..., "text_encoder": ...}, each the module's ``params`` tree.
        scheduler_config: the diffusers scheduler config that ``scheduler="ClassName"`` rebuilds
            from (default: scheduler.to_config()). use_attention_mask: pass the tokenizer's
            attention mask to the text encoder (text encoders configured with it).
        """
        name = type(self).__name__
        missing = set(self.PARAM_KEYS) - set(params)
        if missing:
            raise ConfigError(f"{name}: params lacks {sorted(missing)}; pass a dict with {', '.join(self.PARAM_KEYS)}.")
        if not isinstance(unet, UNet3DConditionModel):
            raise ConfigError(f"{name}: unet is a {type(unet).__name__}; this pipeline runs a UNet3DConditionModel.")
        if unet.in_channels != vae.latent_channels or unet.out_channels != vae.latent_channels:
            raise ConfigError(f"{name}: the U-Net maps {unet.in_channels} -> {unet.out_channels} channels; both must "
                              f"be the VAE's {vae.latent_channels} latent channels.")
        if unet.cross_attention_dim != text_encoder.hidden_size:
            raise ConfigError(f"{name}: the U-Net's cross_attention_dim={unet.cross_attention_dim} differs from the "
                              f"text encoder's hidden_size={text_encoder.hidden_size}; the parts do not fit together.")
        if not isinstance(scheduler, Scheduler):
            raise TypeError(f"scheduler must be a jaxgen Scheduler, got {type(scheduler).__name__}.")
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.params = {k: params[k] for k in self.PARAM_KEYS}
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else scheduler.to_config()
        self.use_attention_mask = bool(use_attention_mask)
        self.vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, allow_pickle: bool = False, dtype=None):
        """Load a diffusers TextToVideoSDPipeline folder: model_index.json with unet
        (UNet3DConditionModel), vae, text_encoder, tokenizer, scheduler; any other component is a
        ConfigError. allow_pickle: read .bin weights (see load_pretrained). dtype: as
        StableDiffusionPipeline.from_pretrained (None: float32; bfloat16 / float16)."""
        folder = os.fspath(folder)
        index = read_json(os.path.join(folder, "model_index.json"))
        if index.get("_class_name") not in PIPELINE_CLASSES:
            raise ConfigError(f"{folder}/model_index.json describes a {index.get('_class_name')!r}; this pipeline "
                              f"loads {', '.join(PIPELINE_CLASSES)} folders.")
        for comp, spec in index.items():
            if comp.startswith("_") or not isinstance(spec, (list, tuple)) or comp in REQUIRED:
                continue
            if spec[0] is not None:
                raise ConfigError(f"{folder}: component {comp!r} ({spec}) is not part of a TextToVideoSDPipeline.")
        for comp, expected in REQUIRED.items():
            spec = index.get(comp)
            if not isinstance(spec, (list, tuple)) or spec[0] is None:
                raise ConfigError(f"{folder}/model_index.json has no {comp!r} component; a text-to-video folder "
                                  "needs unet, vae, text_encoder, tokenizer and scheduler.")
            if expected is not None and spec[1] != expected:
                raise ConfigError(f"{folder}: {comp} is a {spec[1]}; this pipeline takes a {expected}.")
        kw = dict(allow_pickle=allow_pickle, **model_dtype_options(dtype))
        unet, unet_p = load_pretrained(os.path.join(folder, "unet"), **kw)
        vae, vae_p = load_pretrained(os.path.join(folder, "vae"), **kw)
        te_dir = os.path.join(folder, "text_encoder")
        text, text_p = load_pretrained(te_dir, **kw)
        use_mask = bool(read_json(os.path.join(te_dir, "config.json")).get("use_attention_mask", False))
        sched_cfg = read_json(os.path.join(folder, "scheduler", SCHEDULER_CONFIG_NAME))
        return cls(unet, vae, text, {"unet": unet_p, "vae": vae_p, "text_encoder": text_p},
                   load_tokenizer(os.path.join(folder, "tokenizer")), scheduler_from_config(sched_cfg),
                   scheduler_config=sched_cfg, use_attention_mask=use_mask)

    def encode_prompt(self, prompt: str | Sequence[str]) -> np.ndarray:
        """The U-Net's context of each prompt, float32 [N, 77, D] (``encode_prompts``, as Stable Diffusion)."""
        return encode_prompts(self.text_encoder, self.params["text_encoder"], self.tokenizer, prompt,
                              use_attention_mask=self.use_attention_mask)

    # -- the call -----------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_frames: int = 16, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 9.0, latents=None, scheduler=None,
                 seed: int = 0, *, eta: float = 0.0, output_type: str = "np") -> np.ndarray:
        """Generate one video per prompt.

        prompt: a string or P strings; negative_prompt: None (the empty prompt), one string for
            all, or P strings; used only when guidance_scale > 1 (diffusers' rule).
        num_frames: F >= 1. height, width: pixels, multiples of vae_scale_factor f; default
            unet.sample_size * f.
        latents: unit Gaussian noise [P, F, H/f, W/f, C] float (diffusers' [P, C, F, h, w] as
            latents.permute(0, 2, 3, 4, 1)), multiplied by the scheduler's init_noise_sigma.
        scheduler: a jaxgen Scheduler, a diffusers class name (built from this pipeline's scheduler
            config) or None (the default). seed: int or typed key, the root of every draw not given.
        eta: DDIM's eta (DDIMScheduler only). output_type: "np" (frames float32 [P, F, H, W, 3] in
            [0, 1]) or "latent" ([P, F, H/f, W/f, C]).
        """
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type={output_type!r}; use 'np' (frames) or 'latent'.")
        prompts = as_texts(prompt, "prompt")
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames!r}; it must be an int >= 1.")
        h, w = (s // self.vae_scale_factor for s in self._size(height, width))
        shape = (len(prompts), int(num_frames), h, w, self.vae.latent_channels)
        root = root_key(seed)
        noise = self._latents(latents, root, shape)

        from jaxgen.training.config_values import check_guidance
        cfg = check_guidance(guidance_scale, "as in diffusers, guidance_scale <= 1 applies no classifier-free "
                             "guidance: the prompt alone conditions the video.") > 1.0
        sched = self.get_scheduler(scheduler)
        step_kwargs = {}
        if eta:
            if "eta" not in inspect.signature(sched.step).parameters:
                raise ValueError(f"eta={eta} applies to DDIMScheduler only; {type(sched).__name__} has no eta.")
            step_kwargs["eta"] = float(eta)
        texts = self._negatives(negative_prompt, len(prompts)) + prompts if cfg else prompts
        context = jnp.asarray(self.encode_prompt(texts))                            # [P or 2P, L, D]
        cond, uncond = (context[len(prompts):], context[:len(prompts)]) if cfg else (context, None)
        state = sched.set_timesteps(num_inference_steps)
        out = _loop_stage(self.unet, self.params["unet"], state, cond, uncond, noise, jnp.asarray(guidance_scale, F32),
                          jax.random.fold_in(root, _KEY_STEPS), scheduler=sched,
                          step_kwargs=tuple(sorted(step_kwargs.items())))
        if output_type == "np":
            out = _decode_stage(self.vae, self.params["vae"], out)
        return np.asarray(jax.device_get(out))

    @staticmethod
    def trace_counts() -> dict[str, int]:
        """How many times each compiled stage has been traced in this process: "loop", "decode"
        (this pipeline's, over all instances) and "context" (the text encoder stage it shares
        with StableDiffusionPipeline)."""
        return {**_TRACES, "context": StableDiffusionPipeline.trace_counts().get("context", 0)}

    # -- host-side checks ---------------------------------------------------------------------
    def _size(self, height, width) -> tuple[int, int]:
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
            raise ValueError(f"height/width: {height}x{width} pixels; both must be positive multiples of {f} (the "
                             f"VAE's downsampling factor), e.g. {max(f, height // f * f)}x{max(f, width // f * f)}.")
        return height, width

    @staticmethod
    def _negatives(negative, n: int) -> list[str]:
        if negative is None:
            return [""] * n
        if isinstance(negative, str):
            return [negative] * n
        negatives = as_texts(negative, "negative_prompt")
        if len(negatives) != n:
            raise ValueError(f"{len(negatives)} negative prompts for {n} prompts; pass one per prompt, or one "
                             "string for all.")
        return negatives

    @staticmethod
    def _latents(given, root, shape: tuple) -> jax.Array:
        """The given unit noise [P, F, h, w, C] (checked) or a draw from fold_in(root, 0)."""
        if given is None:
            return jax.random.normal(jax.random.fold_in(root, _KEY_LATENTS), shape, F32)
        x = jnp.asarray(given, F32)
        if tuple(x.shape) == tuple(shape):
            return x
        p, f, h, w, c = shape
        if x.ndim == 5 and x.shape[1] == c and tuple(x.shape[2:]) == (f, h, w) and x.shape[0] == p:
            hint = "; these look like diffusers' [B, C, F, h, w] latents: pass latents.permute(0, 2, 3, 4, 1)"
        elif x.ndim == 5 and x.shape[1] != f and (x.shape[0], *x.shape[2:]) == (p, h, w, c):
            hint = f"; they hold {x.shape[1]} frames but num_frames={f}: pass num_frames={x.shape[1]}"
        else:
            hint = " ([prompts, num_frames, height / f, width / f, latent channels])"
        raise DataError(f"latents have shape {tuple(x.shape)}; this call needs {tuple(shape)}{hint}.")


# ------------------------------------------------------------------------------------------------
# the compiled stages (module-level: pipelines with equal modules share them)
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("unet", "scheduler", "step_kwargs"))
def _loop_stage(unet, params, state, cond, uncond, noise, guidance_scale, step_key, *, scheduler: Scheduler,
                step_kwargs: tuple):
    """The denoising loop, one lax.scan. cond (uncond or None: no guidance): [P, L, D];
    noise: unit Gaussian [P, F, h, w, C]; guidance_scale: [] float32. Returns the final latents
    [P, F, h, w, C]. The scheduler works on [(P F), h, w, C] (diffusers' frame folding)."""
    _TRACES["loop"] += 1
    p, f, h, w, c = noise.shape

    def model_fn(x_in, t, ctx):                      # x_in: [(N F), h, w, C]; ctx: [N, L, D]
        x = x_in.reshape(-1, f, h, w, c)             # [N, F, h, w, C]
        out = unet.apply({"params": params}, x, jnp.broadcast_to(t, (x.shape[0],)), ctx)
        return out.reshape(x_in.shape)

    x = sample_loop(scheduler, state, model_fn, noise.reshape(p * f, h, w, c), key=step_key, cond=cond,
                    uncond=uncond, guidance_scale=guidance_scale if uncond is not None else 1.0,
                    step_kwargs=dict(step_kwargs))
    return x.reshape(p, f, h, w, c)


@functools.partial(jax.jit, static_argnames=("vae",))
def _decode_stage(vae, params, latents):
    """latents [P, F, h, w, C] -> frames float32 [P, F, H, W, 3] in [0, 1]: every frame decoded
    (one VAE batch of P F) from 1 / scaling_factor * latents (+ shift_factor), then clip(x / 2 + 0.5, 0, 1)."""
    _TRACES["decode"] += 1
    p, f = latents.shape[:2]
    z = (1 / vae.scaling_factor) * latents.reshape((p * f,) + latents.shape[2:]) + (vae.shift_factor or 0.0)
    frames = vae.apply({"params": params}, z, method="decode")                      # [(P F), H, W, 3]
    return jnp.clip(frames / 2 + 0.5, 0.0, 1.0).astype(F32).reshape((p, f) + frames.shape[1:])
