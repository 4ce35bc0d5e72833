"""A ControlNet trained on a finished, frozen latent-diffusion run (task "controlnet").

    python -m train --config configs/shapes_controlnet.py --workdir runs/shapes_controlnet \\
        --config.base_run=runs/shapes_ldm

The base run (``config.base_run``, see jaxgen/training/tasks/ldm_base.py) gives the autoencoder,
the text encoder and the U-Net, all frozen. The ControlNet starts as diffusers'
``ControlNetModel.from_unet`` (``jaxgen.nn.controlnet.controlnet_from_unet``): the U-Net's encoder
copied, every zero convolution zero, so at step 0 the stack samples exactly as the base. It is
trained on (image, caption, control image) examples with the base's own objective (schedule,
prediction type, loss weights, latent scaling): the ControlNet's residuals are added to the
frozen U-Net's skip connections and middle block, and only the ControlNet's parameters are in
the optimizer and the checkpoints.

Config (configs/shapes_controlnet.py):
  controlnet.control_field     the dataset field of the control image (shapes: "mask", with
                               data.options.masks=True), uint8 [H, W, 1 or 3] at pixel size
  model.conditioning_embedding_out_channels, model.conditioning_channels: the ControlNet fields
                               the base U-Net does not fix (every other field is the U-Net's;
                               control images with one channel are repeated to conditioning_channels)
  controlnet.caption_dropout   probability of the empty prompt (the ControlNet paper drops 50%)
  controlnet.color_caption_prob  probability that a shapes caption is replaced by its colour-only
                               form "a red shape" (so prompts naming only a colour work)
  controlnet.pattern_fraction  extra training examples, as a fraction of the data, that are random
                               binary grid patterns in one colour ("a red pattern"): the "QR code"
                               exercise (jaxgen.data.shapes.grid_patterns)
  controlnet.pattern_cells     the grid's cells per side

The run: ``run.sample(num, prompts=..., control=uint8 [N, H, W, 1 or 3], seed=0, num_steps=None,
guidance_scale=None, scheduler=None, conditioning_scale=1.0)`` -> uint8 [N, H, W, 3], through
``jaxgen.StableDiffusionControlNetPipeline`` built from the base's stack and this ControlNet
(``pipeline_components``: what ``python -m train.export`` writes, a diffusers
StableDiffusionControlNetPipeline folder). ``python -m train.eval``: docs/CONTROLNET.md.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data import shapes
from jaxgen.data.fields import Input
from jaxgen.errors import ConfigError, DataError
from jaxgen.eval.images import make_grid, preview_upscale
from jaxgen.nn.controlnet import ControlNetModel, controlnet_from_unet
from jaxgen.training.config_values import check_range, plain
from jaxgen.training.tasks.ldm_base import FrozenLDMTask

PATTERN_SEED = 1234        # the grid patterns added to the training data


def color_caption(caption: str) -> str:
    """"a red shape" for a caption that names one shapes colour (red) in any phrasing; the
    caption itself otherwise."""
    named = [c for c in shapes.COLORS if c in caption.lower().split()]
    return f"a {named[0]} shape" if len(named) == 1 else caption


class ControlNetTask(FrozenLDMTask):
    """Task "controlnet" (module docstring). Batches: {"latent_mean", "latent_std": float32
    [B, h, w, c]; "caption", "caption_alt": int32 [B] rows of the context table; "control":
    uint8 [B, H, W, C]}."""

    name = "controlnet"
    abilities = ("sample", "encode_text", "tokenizer")

    def __init__(self, config):
        super().__init__(config)
        cn = config.get("controlnet", None)
        if cn is None:
            raise ConfigError("a controlnet config needs config.controlnet (see configs/shapes_controlnet.py).")
        check_range("controlnet.caption_dropout", cn.caption_dropout, 0.0, 1.0, high_open=True)
        check_range("controlnet.color_caption_prob", cn.color_caption_prob, 0.0, 1.0)
        check_range("controlnet.pattern_fraction", cn.pattern_fraction, 0.0, 4.0,
                    hint="extra pattern examples as a fraction of the dataset; 0 switches them off")
        self.table = None
        self._from_unet = None

    def build_model(self) -> ControlNetModel:
        cn = self.config.model
        if self.config.model_class != "jaxgen.nn.controlnet:ControlNetModel":
            raise ConfigError(f"model_class={self.config.model_class!r}: a controlnet run trains "
                              "jaxgen.nn.controlnet:ControlNetModel.")
        unknown = sorted(set(cn) - {"conditioning_embedding_out_channels", "conditioning_channels"})
        if unknown:
            raise ConfigError(f"config.model sets {', '.join(unknown)}: a controlnet run takes every field from "
                              "the base U-Net except conditioning_embedding_out_channels and conditioning_channels.")
        module, params = controlnet_from_unet(
            self.ldm.model, self.base_params["unet"],
            conditioning_embedding_out_channels=tuple(plain(cn.conditioning_embedding_out_channels)),
            conditioning_channels=int(cn.conditioning_channels), key=int(self.config.seed))
        factor = self.ldm.vae_factor
        if module.downscale_factor != factor:
            n = int(np.log2(factor)) + 1
            raise ConfigError(f"controlnet.conditioning_embedding_out_channels="
                              f"{tuple(cn.conditioning_embedding_out_channels)} embeds control images by a "
                              f"factor {module.downscale_factor}, but the base's autoencoder has factor {factor}: "
                              f"give {n} entries.")
        self._from_unet = params
        return module

    # -- data ----------------------------------------------------------------------------------
    @property
    def control_field(self) -> str:
        return str(self.config.controlnet.control_field)

    def inputs(self) -> dict[str, Input]:
        h, w, _ = self.image_shape
        return {"image": Input("image", self.image_shape, doc="the training image"),
                "caption": Input("text", doc="its caption"),
                self.control_field: Input("image", (h, w, None), doc="the control image (white on black "
                                          "for a shapes mask), at pixel size")}

    def batch_arrays(self, ds):
        """The gathered fields, the pattern examples appended, the images encoded once by the
        frozen autoencoder and the captions (and their colour-only forms) once by the text tower."""
        fields = self.gather(ds)
        cn = self.config.controlnet
        images, captions = fields["image"], list(fields["caption"])
        control = self.as_control(fields[self.control_field])
        extra = int(round(float(cn.pattern_fraction) * len(images)))
        if extra:
            if self.image_shape != (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3):
                raise ConfigError("controlnet.pattern_fraction > 0 draws 32x32 shapes-style patterns; set it to "
                                  "0 for other data.")
            pat = shapes.grid_patterns(extra, PATTERN_SEED, cells=int(cn.pattern_cells))
            images = np.concatenate([images, pat["image"]])
            control = np.concatenate([control, self.as_control(pat["mask"])])
            captions += [f"a {shapes.COLORS[c]} pattern" for c in pat["color"]]
        alt = [color_caption(c) for c in captions]
        texts = sorted(set(captions) | set(alt))
        index = {c: i for i, c in enumerate(texts)}
        self.table = self.context_table(texts)
        mean, std = self.latent_moments(images)
        return {"latent_mean": mean, "latent_std": std,
                "caption": np.asarray([index[c] for c in captions], np.int32),
                "caption_alt": np.asarray([index[c] for c in alt], np.int32),
                "control": control}

    def as_control(self, control) -> np.ndarray:
        """uint8 [N, H, W, 1 or C] -> uint8 [N, H, W, C] with C = conditioning_channels (one
        channel repeated), checked against the image size."""
        control = np.asarray(control)
        h, w, _ = self.image_shape
        c = int(self.config.model.conditioning_channels)
        if control.dtype != np.uint8 or control.ndim != 4 or control.shape[1:3] != (h, w) \
                or control.shape[-1] not in (1, c):
            raise DataError(f"control images must be uint8 [N, {h}, {w}, 1 or {c}] (white on black), got "
                            f"{control.dtype} {control.shape}.")
        return np.repeat(control, c, axis=-1) if control.shape[-1] != c else control

    def example_batch(self) -> dict:
        h, w, c = self.latent_shape
        H, W, _ = self.image_shape
        z = np.zeros((1, h, w, c), np.float32)
        return {"latent_mean": z, "latent_std": z, "caption": np.zeros((1,), np.int32),
                "caption_alt": np.zeros((1,), np.int32),
                "control": np.zeros((1, H, W, int(self.config.model.conditioning_channels)), np.uint8)}

    # -- model ---------------------------------------------------------------------------------
    def init_params(self, key, batch) -> Any:
        """diffusers' ControlNetModel.from_unet of the base U-Net (encoder copied, zero
        convolutions zero; the conditioning embedding drawn from config.seed)."""
        return self._from_unet

    def loss_fn(self, params, batch, key):
        if self.table is None:
            raise ConfigError("ControlNetTask.loss_fn needs batch_arrays(...) first (the text context table).")
        cn = self.config.controlnet
        k_noise, k_alt = jax.random.split(key)
        alt = jax.random.bernoulli(k_alt, float(cn.color_caption_prob), batch["caption"].shape)
        rows = jnp.where(alt, batch["caption_alt"], batch["caption"])
        zt, t, target, ctx, _ = self.diffusion_inputs(k_noise, batch["latent_mean"], batch["latent_std"], rows,
                                                      self.table, float(cn.caption_dropout))
        cond = batch["control"].astype(jnp.float32) / 255.0
        down, mid = self.model.apply({"params": params}, zt, t, ctx, cond)
        out = self.ldm.model.apply({"params": self.base_params["unet"]}, zt, t, ctx,
                                   down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
        loss, mse = self.weighted_mse(out, target, t)
        return loss, {"mse": mse}

    # -- the run ---------------------------------------------------------------------------------
    def pipeline_components(self, params) -> dict[str, Any]:
        """The base's StableDiffusionPipeline components plus {"controlnet": (module, params)} and
        the diffusers pipeline class the export writes."""
        c = self.ldm.pipeline_components(self.base_params)
        c["controlnet"] = (self.model, params)
        c["pipeline_class"] = "StableDiffusionControlNetPipeline"
        return c

    def pipeline(self, params):
        from jaxgen.pipelines.controlnet import StableDiffusionControlNetPipeline

        c = self.pipeline_components(params)
        return StableDiffusionControlNetPipeline(
            c["unet"][0], c["vae"][0], c["text_encoder"][0],
            {k: c[k][1] for k in ("unet", "vae", "text_encoder", "controlnet")}, c["tokenizer"], c["scheduler"],
            controlnet=c["controlnet"][0])

    def sample(self, params, num, seed=0, labels=None, prompts=None, num_steps=None, guidance_scale=None,
               scheduler=None, control=None, conditioning_scale: float = 1.0):
        """``num`` images uint8 [num, H, W, 3] for ``prompts`` (one str, or num) under ``control``
        (uint8 [num or 1, H, W, 1 or 3], white on black); settings as the base run's sample."""
        if labels is not None:
            raise DataError("this run is text-conditioned: pass prompts=, not labels.")
        if control is None:
            raise DataError("a controlnet run samples under a control image: pass control=uint8 "
                            f"[num, {self.image_shape[0]}, {self.image_shape[1]}, 1 or 3].")
        prompts = self.ldm.sample_prompts(num, prompts)
        control = self.as_control(control)
        if len(control) == 1:
            control = np.repeat(control, len(prompts), axis=0)
        if len(control) != len(prompts):
            raise DataError(f"{len(control)} control images for {len(prompts)} samples: pass one, or one per sample.")
        steps, g, sched = self.sampling_settings(num_steps, guidance_scale, scheduler)
        return self.ldm.pipeline_samples(self.pipeline(params), prompts, seed, steps, g, sched,
                                         per_image={"image": control.astype(np.float32) / 255.0},
                                         controlnet_conditioning_scale=float(conditioning_scale))

    def encode_text(self, params, texts) -> np.ndarray:
        return self.ldm.encode_text(self.base_params, texts)

    def preview(self, params, batch):
        control = np.asarray(jax.device_get(batch["control"]))[:8]
        images = self.sample(params, len(control), prompts="", control=control)
        return make_grid(np.concatenate([control, images]), ncol=len(control),
                         upscale=preview_upscale(images.shape[1]))

    def evaluate(self, run, out_dir: str) -> dict:
        from jaxgen.eval import controlnet as cn_eval

        return cn_eval.evaluate(run, out_dir, self.config.get("eval", None))
