"""Stable Diffusion with one or several ControlNets: diffusers' StableDiffusionControlNetPipeline
(and its MultiControlNetModel), the whole denoising loop one compiled program.

    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder)            # controlnet/ inside
    pipe = StableDiffusionControlNetPipeline.from_pretrained(sd_folder, controlnet=[cn1, cn2])
    images = pipe("a red circle", image=control, controlnet_conditioning_scale=1.0,
                  control_guidance_start=0.0, control_guidance_end=1.0, guess_mode=False)
    # control: float [N, H, W, 3] in [0, 1] or uint8 (a list of them, one per ControlNet)
    # images: float32 numpy [B, H, W, 3] in [0, 1]

It is ``StableDiffusionPipeline`` (text encoding, noise, schedulers, the compiled loop, decoding)
with a ``LoopControl`` hook that runs the ControlNets inside the loop and hands their residuals
to the U-Net (``down_block_additional_residuals`` / ``mid_block_additional_residual``):

* Each ControlNet k runs on the scaled latents and the text context of the U-Net call (with
  guidance: [uncond; cond] and the control image twice), at scale
  ``controlnet_conditioning_scale[k] * keep[i, k]``; several ControlNets' residuals are summed.
* ``keep[i, k]`` is diffusers' ``controlnet_keep``: 0 when ``i / n < control_guidance_start[k]``
  or ``(i + 1) / n > control_guidance_end[k]`` (n ladder entries, i the ladder index), else 1.
  It is an array indexed by the traced step, so changing the fractions does not recompile; a
  ControlNet whose keep is 0 at a step is skipped at run time (``lax.cond``; its residuals are
  zero, which is what diffusers' scale-0 pass returns).
* ``guess_mode`` (forced on by a ControlNet with ``global_pool_conditions``): with guidance the
  ControlNets see the conditional half only and the unconditional half gets zero residuals;
  every ControlNet scales its residuals by 10**linspace(-1, 0) (see jaxgen.nn.controlnet).
* Control images are RGB float in [0, 1] (uint8 / 255) at the output size (diffusers'
  control image processor: no normalisation to [-1, 1]); N = 1 image serves every output image,
  N = P gives image i to prompt i's images (N = B: one per output image).

Deliberate differences from diffusers: control images must already have the output size
(diffusers resizes them: resize first); image-to-image and inpainting with ControlNets
(separate diffusers pipelines) are not implemented; no IP-Adapter, no prompt embeddings.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.config import read_json
from jaxgen.convert.pretrained import load_pretrained
from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.controlnet import ControlNetModel, ControlNetOutput
from jaxgen.pipelines.stable_diffusion import (PIPELINE_CLASSES, LoopControl, StableDiffusionPipeline, as_images,
                                               as_texts, model_dtype_options)

F32 = jnp.float32
CONTROLNET_PIPELINE_CLASSES = PIPELINE_CLASSES + ("StableDiffusionControlNetPipeline",)


def controlnet_keep(num_entries: int, starts: Sequence[float], ends: Sequence[float]) -> np.ndarray:
    """diffusers' ``controlnet_keep`` as float32 [num_entries, K]: entry [i, k] is 0 when
    i / n < starts[k] or (i + 1) / n > ends[k] (n = num_entries ladder entries), else 1."""
    n = int(num_entries)
    return np.array([[1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(starts, ends)]
                     for i in range(n)], np.float32)


@dataclasses.dataclass(frozen=True)
class ControlNetResiduals(LoopControl):
    """The loop hook: the ControlNets' summed residuals for each U-Net call (static part).

    inputs (the traced part): {"params": K parameter trees, "images": K control images
    [B, H, W, C_k] in [0, 1], "scales": float32 [K], "keep": float32 [n, K]}.
    """

    controlnets: tuple[ControlNetModel, ...]
    guess_mode: bool

    def unet_kwargs(self, inputs, x_in, t, i, context, cfg: bool) -> dict[str, Any]:
        guided_control = cfg and not self.guess_mode
        if guided_control:                                        # [2B]: uncond, then cond
            x = jnp.concatenate([x_in, x_in], axis=0)
            ctx = jnp.concatenate([context["uncond"], context["cond"]], axis=0)
        else:
            x, ctx = x_in, context["cond"]
        timesteps = jnp.broadcast_to(t, (x.shape[0],))
        total = None
        for k, net in enumerate(self.controlnets):
            image = inputs["images"][k]
            if guided_control:
                image = jnp.concatenate([image, image], axis=0)
            keep = inputs["keep"][i, k]
            scale = inputs["scales"][k] * keep

            def run(params, image=image, scale=scale, net=net) -> ControlNetOutput:
                return net.apply({"params": params}, x, timesteps, ctx, image.astype(x.dtype), scale,
                                 self.guess_mode)

            shapes = jax.eval_shape(run, inputs["params"][k])
            out = jax.lax.cond(keep > 0, run,
                               lambda _p, s=shapes: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), s),
                               inputs["params"][k])
            total = out if total is None else total + out
        down, mid = total
        if cfg and self.guess_mode:                               # the unconditional half: no control
            down = tuple(jnp.concatenate([jnp.zeros_like(d), d], axis=0) for d in down)
            mid = jnp.concatenate([jnp.zeros_like(mid), mid], axis=0)
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


def _per_net(value, k: int, what: str, kind=float) -> list:
    """A value for every ControlNet: one for all, or a list of k."""
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"{what} has {len(value)} entries for {k} ControlNets; pass one per ControlNet "
                             "(or a single value for all).")
        return [kind(v) for v in value]
    return [kind(value)] * k


class StableDiffusionControlNetPipeline(StableDiffusionPipeline):
    """Stable Diffusion 1.x / 2.x guided by ControlNets (diffusers' StableDiffusionControlNetPipeline).

    ``pipe(prompt, image, ...)`` is text-to-image with control images; it returns float32 numpy
    [B, H, W, 3] in [0, 1]. Attributes: those of StableDiffusionPipeline, and ``controlnets``
    (a tuple of ControlNetModel modules; their parameters are ``params["controlnet"]``, one tree
    per ControlNet).
    """

    PARAM_KEYS = StableDiffusionPipeline.PARAM_KEYS + ("controlnet",)

    def __init__(self, unet, vae, text_encoder, params: Mapping[str, Any], tokenizer, scheduler, *,
                 controlnet: ControlNetModel | Sequence[ControlNetModel], **kwargs):
        """As StableDiffusionPipeline's, plus controlnet: one ControlNetModel or a list of them
        (diffusers' MultiControlNetModel), with params["controlnet"] the matching parameter tree
        or list of trees."""
        nets = tuple(controlnet) if isinstance(controlnet, (list, tuple)) else (controlnet,)
        if not nets:
            raise ConfigError("StableDiffusionControlNetPipeline: controlnet is an empty list; pass at least one.")
        params = dict(params)
        if "controlnet" not in params:
            raise ConfigError("StableDiffusionControlNetPipeline: params lacks 'controlnet' (the ControlNets' "
                              "parameter trees).")
        trees = params["controlnet"]
        trees = tuple(trees) if isinstance(trees, (list, tuple)) else (trees,)
        if len(trees) != len(nets):
            raise ConfigError(f"StableDiffusionControlNetPipeline: {len(nets)} ControlNets but {len(trees)} "
                              "parameter trees in params['controlnet'].")
        params["controlnet"] = trees
        super().__init__(unet, vae, text_encoder, params, tokenizer, scheduler, **kwargs)
        for k, net in enumerate(nets):
            self._check_controlnet(net, k)
        pools = {net.global_pool_conditions for net in nets}
        if len(pools) > 1:
            raise ConfigError("StableDiffusionControlNetPipeline: the ControlNets disagree on "
                              "global_pool_conditions; diffusers reads it from the first only. Combine "
                              "ControlNets of one kind.")
        self.controlnets = nets

    def _check_controlnet(self, net, k: int) -> None:
        """A ControlNetModel built for this U-Net's encoder and this VAE's factor; else a ConfigError."""
        where = f"StableDiffusionControlNetPipeline: ControlNet {k}"
        if not isinstance(net, ControlNetModel):
            raise ConfigError(f"{where} is a {type(net).__name__}; pass ControlNetModel modules.")
        unet = self.unet
        for field in ("in_channels", "block_out_channels", "down_block_types", "mid_block_type"):
            if getattr(net, field) != getattr(unet, field):
                raise ConfigError(f"{where} has {field}={getattr(net, field)!r} but the U-Net has "
                                  f"{getattr(unet, field)!r}; a ControlNet's residuals fit the U-Net it was made for.")
        layers = unet.layers_per_block
        if any(n != net.layers_per_block for n in (layers if isinstance(layers, tuple) else (layers,))):
            raise ConfigError(f"{where} has layers_per_block={net.layers_per_block} but the U-Net has {layers!r}.")
        if net.cross_attention_dim != self.text_encoder.hidden_size:
            raise ConfigError(f"{where} has cross_attention_dim={net.cross_attention_dim}; the text encoder's "
                              f"hidden_size is {self.text_encoder.hidden_size}.")
        if net.downscale_factor != self.vae_scale_factor:
            raise ConfigError(f"{where} embeds control images by a factor {net.downscale_factor} "
                              f"(conditioning_embedding_out_channels={net.conditioning_embedding_out_channels}) "
                              f"but the VAE's factor is {self.vae_scale_factor}; control images are at pixel size.")

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, controlnet=None, *, mesh: jax.sharding.Mesh | None = None,
                        batch_axis: str | None = None, allow_pickle: bool = False, dtype=None):
        """Load a diffusers StableDiffusionControlNetPipeline folder (controlnet/ inside; a
        MultiControlNetModel is controlnet/, controlnet_1/, ...), or any Stable Diffusion folder
        with ``controlnet=``: a ControlNetModel folder, or a list of folders (several
        ControlNets, diffusers' MultiControlNetModel), which replaces the folder's own.
        mesh, batch_axis, allow_pickle, dtype: as StableDiffusionPipeline.from_pretrained (dtype
        applies to the ControlNets too).
        """
        folder = os.fspath(folder)
        if controlnet is None:
            folders = cls._controlnet_folders(folder, read_json(os.path.join(folder, "model_index.json")))
        elif isinstance(controlnet, (list, tuple)):
            folders = [os.fspath(f) for f in controlnet]
        else:
            folders = [os.fspath(controlnet)]
        if not folders:
            raise ConfigError("controlnet= is an empty list; pass one ControlNetModel folder or several.")
        parts, _ = cls.load_components(folder, pipeline_classes=CONTROLNET_PIPELINE_CLASSES, others=("controlnet",),
                                       allow_pickle=allow_pickle, dtype=dtype)
        nets, trees = [], []
        for f in folders:
            net, tree = load_pretrained(f, allow_pickle=allow_pickle, **model_dtype_options(dtype))
            if not isinstance(net, ControlNetModel):
                raise ConfigError(f"{f} holds a {type(net).__name__}, not a ControlNetModel.")
            nets.append(net)
            trees.append(tree)
        parts["params"] = {**parts["params"], "controlnet": trees}
        return cls(**parts, controlnet=nets, mesh=mesh, batch_axis=batch_axis)

    @staticmethod
    def _controlnet_folders(folder: str, index: Mapping[str, Any]) -> list[str]:
        spec = index.get("controlnet")
        if not isinstance(spec, (list, tuple)) or spec[0] is None:
            raise ConfigError(f"{folder}/model_index.json has no 'controlnet' component; pass controlnet= "
                              "(a ControlNetModel folder, or a list of them).")
        base = os.path.join(folder, "controlnet")
        if spec[1] == "ControlNetModel":
            return [base]
        if spec[1] == "MultiControlNetModel":       # diffusers saves nets 1.. beside the first
            folders = [base]
            while os.path.isdir(f"{base}_{len(folders)}"):
                folders.append(f"{base}_{len(folders)}")
            return folders
        raise ConfigError(f"{folder}: controlnet is a {spec[1]}; this pipeline runs ControlNetModel and "
                          "MultiControlNetModel.")

    # -- the call ---------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str], image=None, negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, seed: int = 0, latents=None, scheduler=None, *,
                 controlnet_conditioning_scale: float | Sequence[float] = 1.0,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, guess_mode: bool = False,
                 num_images_per_prompt: int = 1, eta: float = 0.0, output_type: str = "np") -> np.ndarray:
        """Text-to-image with control images (diffusers' StableDiffusionControlNetPipeline.__call__).

        image: the control image(s): float [N, H, W, C] in [0, 1] or uint8 (one [H, W, C] is
            N = 1), C the ControlNet's conditioning_channels (3: RGB); N = 1, P or B. With several
            ControlNets, a list with one such array per ControlNet (all the same size).
        height, width: default the control images' size; if given, they must equal it.
        controlnet_conditioning_scale: multiplies the residuals; one float, or one per ControlNet.
        control_guidance_start, control_guidance_end: fractions of the ladder in [0, 1] within
            which each ControlNet acts (one float, or one per ControlNet; start < end).
        guess_mode: see the module docstring (forced on by global_pool_conditions).
        Other arguments as StableDiffusionPipeline.__call__ (no guidance_rescale: diffusers'
        ControlNet pipeline has none). Returns float32 [B, H, W, 3] in [0, 1] (or latents).
        """
        k = len(self.controlnets)
        images = self._control_images(image, k)
        h, w = images[0].shape[1:3]
        if (height is not None and int(height) != h) or (width is not None and int(width) != w):
            raise DataError(f"height/width {height}x{width} differ from the control images' {h}x{w}; resize the "
                            "control images to the output size (jaxgen does not resize them).")
        prompts = as_texts(prompt, "prompt")
        batch = len(prompts) * self._per_prompt(num_images_per_prompt)
        for n, im in enumerate(images):
            self._check_count(im.shape[0], len(prompts), batch, f"ControlNet {n} control image")
        scales = _per_net(controlnet_conditioning_scale, k, "controlnet_conditioning_scale")
        starts = _per_net(control_guidance_start, k, "control_guidance_start")
        ends = _per_net(control_guidance_end, k, "control_guidance_end")
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"control_guidance_start={s}, control_guidance_end={e}: they must satisfy "
                                 "0 <= start < end <= 1 (fractions of the denoising ladder).")
        entries = int(self.get_scheduler(scheduler).set_timesteps(num_inference_steps).timesteps.shape[0])
        guess = bool(guess_mode) or self.controlnets[0].global_pool_conditions
        sharding = self._batch_sharding
        expanded = []
        for im in images:                      # N = 1 -> every image, N = P -> per prompt, N = B
            im = jnp.asarray(np.repeat(im, batch // im.shape[0], axis=0))
            expanded.append(im if sharding is None else jax.device_put(im, sharding))
        inputs = {"params": self.params["controlnet"], "images": tuple(expanded),
                  "scales": jnp.asarray(scales, F32), "keep": jnp.asarray(controlnet_keep(entries, starts, ends))}
        return self._text_to_image(prompts, negative_prompt, num_inference_steps, guidance_scale, h, w, seed,
                                   latents, scheduler, num_images_per_prompt=num_images_per_prompt,
                                   guidance_rescale=0.0, eta=eta, output_type=output_type,
                                   control=ControlNetResiduals(self.controlnets, guess), control_inputs=inputs)

    def _control_images(self, image, k: int) -> list[np.ndarray]:
        """The control images, one float32 [N, H, W, C] in [0, 1] per ControlNet."""
        if image is None:
            raise DataError("image= (the control image) is required: float [N, H, W, 3] in [0, 1] or uint8.")
        if k == 1:
            image = [image]
        elif not isinstance(image, (list, tuple)) or len(image) != k:
            raise DataError(f"{k} ControlNets need image= as a list of {k} control images (one array "
                            "[N, H, W, 3] per ControlNet).")
        out = []
        for n, (im, net) in enumerate(zip(image, self.controlnets)):
            x = np.asarray(im)
            if net.conditioning_channels == 3:
                x = as_images(x, f"control image (ControlNet {n})")
            else:
                x = self._non_rgb(x, net.conditioning_channels, n)
            out.append(x)
        if len({x.shape[1:3] for x in out}) > 1:
            raise DataError(f"the control images have different sizes {[x.shape[1:3] for x in out]}; give every "
                            "ControlNet an image of the output size.")
        self._size(out[0].shape[1], out[0].shape[2], what="control image")
        return out

    @staticmethod
    def _non_rgb(x: np.ndarray, channels: int, n: int) -> np.ndarray:
        """A control image with conditioning_channels != 3: [N, H, W, C] or [H, W, C], float in [0, 1] or uint8."""
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[-1] != channels:
            raise DataError(f"control image (ControlNet {n}): expected [N, H, W, {channels}], got shape {x.shape}.")
        if x.dtype == np.uint8:
            return x.astype(np.float32) / 255.0
        x = x.astype(np.float32)
        if x.min() < 0 or x.max() > 1:
            raise DataError(f"control image (ControlNet {n}): float images must lie in [0, 1].")
        return x

    # The inherited image-to-image and inpainting calls would run without the control: refused,
    # since jaxgen has no ControlNet variant of them (diffusers' ...ControlNetImg2Img/Inpaint).
    def img2img(self, *args, **kwargs):
        raise ConfigError("image-to-image with ControlNets (diffusers' StableDiffusionControlNetImg2Img"
                                  "Pipeline) is not implemented; call the pipeline for text-to-image.")

    def inpaint(self, *args, **kwargs):
        raise ConfigError("inpainting with ControlNets (diffusers' StableDiffusionControlNetInpaint"
                                  "Pipeline) is not implemented; call the pipeline for text-to-image.")
