"""InstructPix2Pix trained on a finished, frozen latent-diffusion run (task "ip2p").

    python -m train --config configs/shapes_ip2p.py --workdir runs/shapes_ip2p --config.base_run=runs/shapes_ldm

The base run (``config.base_run``; jaxgen/training/tasks/ldm_base.py) gives the autoencoder and
the text encoder, frozen, and the U-Net this run starts from: ``init_from`` copies it with its
``conv_in`` kernel expanded from C to 2C input channels, the new C zero (the paper's start), so at
step 0 the model ignores the input image and is the base text-to-image model. The whole U-Net is
then fine-tuned on (input image, instruction, edited image) triplets:

* the target is the edited image's latents under the base's objective (schedule, prediction type,
  loss weights, scaling factor); the U-Net's input is [noisy latents, image latents] on the
  channel axis, the image latents being the VAE posterior's mode of the input image, unscaled
  (what diffusers' StableDiffusionInstructPix2PixPipeline feeds);
* conditioning dropout as in the paper: the instruction is replaced by the empty prompt for
  ip2p.text_dropout of the examples, the image latents by zeros for ip2p.image_dropout, both for
  ip2p.both_dropout (5% each by default), which is what the two guidance scales extrapolate from.

Config (configs/shapes_ip2p.py): ip2p.source_field / instruction_field (the dataset fields of
the input image and the instruction; shapes with data.options.edits=True: "source", "instruction"),
the three dropouts, sampling.image_guidance_scale.

The run: ``run.edit(images uint8 [N, H, W, 3], instructions list[str], seed=0, num_steps=None,
guidance_scale=None, image_guidance_scale=None)`` -> uint8 [N, H, W, 3], through
``jaxgen.StableDiffusionInstructPix2PixPipeline`` built from the stack (``pipeline_components``:
what ``python -m train.export`` writes). ``python -m train.eval``: jaxgen/eval/editing.py.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data.fields import Input
from jaxgen.errors import ConfigError, DataError
from jaxgen.training.config_values import check_range
from jaxgen.training.tasks.ldm_base import FrozenLDMTask


class InstructPix2PixTask(FrozenLDMTask):
    """Task "ip2p" (module docstring). Batches: {"latent_mean", "latent_std": float32 [B, h, w, c]
    of the edited image; "image_latents": float32 [B, h, w, c] (the input image's posterior mode);
    "instruction": int32 [B] rows of the context table}."""

    name = "ip2p"
    abilities = ("edit", "encode_text", "tokenizer")

    def __init__(self, config):
        super().__init__(config)
        e = config.get("ip2p", None)
        if e is None:
            raise ConfigError("an ip2p config needs config.ip2p (see configs/shapes_ip2p.py).")
        total = 0.0
        for f in ("text_dropout", "image_dropout", "both_dropout"):
            total += check_range(f"ip2p.{f}", e[f], 0.0, 1.0)
        if total >= 1.0:
            raise ConfigError(f"ip2p dropouts sum to {total:g}: keep text_dropout + image_dropout + both_dropout < 1.")
        self.table = None

    def build_model(self):
        if self.config.model_class != "jaxgen.nn.unet:UNet2DConditionModel":
            raise ConfigError(f"model_class={self.config.model_class!r}: an ip2p run fine-tunes the base's "
                              "jaxgen.nn.unet:UNet2DConditionModel.")
        if set(self.config.model) - {"in_channels"}:
            raise ConfigError("config.model of an ip2p run sets only in_channels (2 x the latent channels); every "
                              "other field is the base U-Net's.")
        c = int(self.ldm.vae.latent_channels)
        if int(self.config.model.in_channels) != 2 * c:
            raise ConfigError(f"model.in_channels={self.config.model.in_channels}: an InstructPix2Pix U-Net takes "
                              f"{2 * c} channels (the base's {c} latent channels and {c} image-latent channels).")
        return self.ldm.model.clone(in_channels=2 * c)

    # -- data ----------------------------------------------------------------------------------
    def inputs(self) -> dict[str, Input]:
        e = self.config.ip2p
        return {"image": Input("image", self.image_shape, doc="the edited image (the target)"),
                e.source_field: Input("image", self.image_shape, doc="the input image"),
                e.instruction_field: Input("text", doc="the instruction that turns the input into the target")}

    def batch_arrays(self, ds):
        e = self.config.ip2p
        fields = self.gather(ds)
        instructions = list(fields[e.instruction_field])
        if any(not t.strip() for t in instructions):
            raise DataError(f"dataset {ds.name}/{ds.split} has empty instructions in field {e.instruction_field!r}.")
        texts = sorted(set(instructions))
        index = {t: i for i, t in enumerate(texts)}
        self.table = self.context_table(texts)
        mean, std = self.latent_moments(fields["image"])
        source_mean, _ = self.latent_moments(fields[e.source_field])
        return {"latent_mean": mean, "latent_std": std, "image_latents": source_mean,
                "instruction": np.asarray([index[t] for t in instructions], np.int32)}

    def example_batch(self) -> dict:
        z = np.zeros((1, *self.latent_shape), np.float32)
        return {"latent_mean": z, "latent_std": z, "image_latents": z, "instruction": np.zeros((1,), np.int32)}

    # -- model ---------------------------------------------------------------------------------
    def init_params(self, key, batch) -> Any:
        """A fresh 2C-channel U-Net; config.init_from then copies the base's (conv_in expanded)."""
        h, w, c = self.latent_shape
        ctx = jnp.zeros((1, 77, self.ldm.context_dim), jnp.float32)
        return self.model.init(key, jnp.zeros((1, h, w, 2 * c), jnp.float32), jnp.zeros((1,), jnp.int32),
                               ctx)["params"]

    def loss_fn(self, params, batch, key):
        if self.table is None:
            raise ConfigError("InstructPix2PixTask.loss_fn needs batch_arrays(...) first (the text context table).")
        e = self.config.ip2p
        k_noise, k_drop = jax.random.split(key)
        b = batch["instruction"].shape[0]
        u = jax.random.uniform(k_drop, (b,))
        pt, pi, pb = float(e.text_dropout), float(e.image_dropout), float(e.both_dropout)
        drop_text = (u < pt) | ((u >= pt + pi) & (u < pt + pi + pb))
        drop_image = (u >= pt) & (u < pt + pi + pb)
        rows = jnp.where(drop_text, self.table.shape[0] - 1, batch["instruction"])
        zt, t, target, ctx, _ = self.diffusion_inputs(k_noise, batch["latent_mean"], batch["latent_std"], rows,
                                                      self.table, 0.0)
        cond = jnp.where(drop_image[:, None, None, None], 0.0, batch["image_latents"])
        out = self.model.apply({"params": params}, jnp.concatenate([zt, cond], axis=-1), t, ctx)
        loss, mse = self.weighted_mse(out, target, t)
        return loss, {"mse": mse}

    # -- the run ---------------------------------------------------------------------------------
    def pipeline_components(self, params) -> dict[str, Any]:
        c = self.ldm.pipeline_components(self.base_params)
        c["unet"] = (self.model, params)
        c["pipeline_class"] = "StableDiffusionInstructPix2PixPipeline"
        return c

    def pipeline(self, params):
        from jaxgen.pipelines.instruct_pix2pix import StableDiffusionInstructPix2PixPipeline

        c = self.pipeline_components(params)
        return StableDiffusionInstructPix2PixPipeline(
            c["unet"][0], c["vae"][0], c["text_encoder"][0], {k: c[k][1] for k in ("unet", "vae", "text_encoder")},
            c["tokenizer"], c["scheduler"])

    def edit(self, params, images, instructions, seed=0, num_steps=None, guidance_scale=None,
             image_guidance_scale=None) -> np.ndarray:
        """Edit uint8 images [N, H, W, 3] by ``instructions`` (one str for all, or N) -> uint8
        [N, H, W, 3]; None settings take config.sampling's (else the base run's)."""
        images = self.check_field("image", images)
        if isinstance(instructions, str):
            instructions = [instructions] * len(images)
        instructions = list(instructions)
        if not instructions:
            raise DataError("instructions is empty: pass one instruction per image (or one str for all).")
        if len(instructions) == 1:
            instructions *= len(images)
        if len(instructions) != len(images):
            raise DataError(f"{len(instructions)} instructions for {len(images)} images: pass one per image, or one for all.")
        if not all(isinstance(t, str) and t.strip() for t in instructions):
            raise DataError("instructions must be non-empty strings.")
        steps, g, sched = self.sampling_settings(num_steps, guidance_scale, None)
        ig = self.config.sampling.image_guidance_scale if image_guidance_scale is None else image_guidance_scale
        return self.ldm.pipeline_samples(self.pipeline(params), instructions, seed, steps, g, sched,
                                         per_image={"image": images}, sized=False,
                                         image_guidance_scale=float(ig))

    def encode_text(self, params, texts) -> np.ndarray:
        return self.ldm.encode_text(self.base_params, texts)

    def evaluate(self, run, out_dir: str) -> dict:
        from jaxgen.eval import editing

        return editing.evaluate(run, out_dir, self.config.get("eval", None))
