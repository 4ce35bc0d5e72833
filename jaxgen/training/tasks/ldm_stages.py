"""The two stages the latent-diffusion run trains itself: the KL autoencoder (stage "vae") and the
text-conditioned U-Net on its latents (stage "unet"). The text stage between them is the CLIP task
unchanged (``jaxgen.training.tasks.clip.ClipTask``); the run that chains the three, samples and
exports is ``jaxgen.training.tasks.ldm.LDMTask``.

* ``vae`` (``KLAutoencoderStage``): ``jaxgen.nn.vae:AutoencoderKL`` (the stage's ``model``) on
  images x in [-1, 1], with one posterior draw z ~ q(z|x) per image:
      loss = rec + objective.beta * kl
      rec  = mean over pixel values of (decode(z) - x)^2   (objective.reconstruction="mse")
             or of |decode(z) - x|                          ("l1")
      kl   = KL(q(z|x) || N(0, I)) per latent element (summed over an image's latent, divided by
             its h * w * c elements; mean over the batch)
* ``unet`` (``UNetStage``): the run's top-level ``model``, a ``UNet2DConditionModel`` on latents
  z0 = scaling_factor * z (z ~ q(z|x), one draw per example and step):
      t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps
      context = text(caption), or text("") with probability diffusion.caption_dropout
      loss = mean_b w_b * mean (unet(z_t, t, context) - target)^2
  target eps / v / z0 per diffusion.prediction_type; w = 1 or min-SNR-gamma. The empty prompt
  is the unconditional input of classifier-free guidance, as in diffusers. text(.) is the frozen
  text tower's ``last_hidden_state`` over all 77 positions, computed by
  ``jaxgen.pipelines.stable_diffusion.encode_prompts``: the same function the sampling pipeline
  conditions its U-Net with.

Caches (the frozen stages never change, so these are exact): the text context of every distinct
training caption and of the empty prompt is computed once, float32 [U + 1, 77, D]; with
diffusion.cache_latents the posterior mean and std of every training image are computed once
(float32 [N, h, w, c] each) and each step draws z from them; without it each step runs the frozen
encoder on the batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data.chunks import map_chunked
from jaxgen.data.fields import Input
from jaxgen.data.pipeline import images_to_float, images_to_uint8
from jaxgen.diffusion import process
from jaxgen.errors import ConfigError
from jaxgen.eval.images import make_grid, preview_upscale
from jaxgen.nn.vae import AutoencoderKL
from jaxgen.pipelines.stable_diffusion import encode_prompts
from jaxgen.training.config_values import check_choice, check_range
from jaxgen.training.tasks.base import Task

if TYPE_CHECKING:
    from jaxgen.training.tasks.ldm import LDMTask

RECONSTRUCTIONS = ("mse", "l1")
CONTEXT_LENGTH = 77                  # the U-Net's context: all 77 positions, as diffusers
CHUNK = 256                          # images per jitted encode / decode / text-encoder call


# ------------------------------------------------------------------------------------------------
# stage 1: the KL autoencoder
# ------------------------------------------------------------------------------------------------
class KLAutoencoderStage(Task):
    """Stage "vae": ``AutoencoderKL`` by reconstruction + beta * KL (see the module docstring).

    Inputs: {"image": uint8 [H, W, C]}. Batches: {"image": uint8 [B, H, W, C]}.
    """

    name = "ldm:vae"

    def __init__(self, config):
        super().__init__(config)
        if not isinstance(self.model, AutoencoderKL):
            raise ConfigError(f"stages.vae.model_class={config.model_class!r}: the ldm task's "
                              "autoencoder stage trains jaxgen.nn.vae:AutoencoderKL.")
        o = config.objective
        check_choice("stages.vae.objective.reconstruction", o.reconstruction, RECONSTRUCTIONS)
        self.beta = check_range("stages.vae.objective.beta", o.beta, 0)
        self._fns: dict = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = self.model.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return int(h), int(w), int(self.model.in_channels)

    def inputs(self) -> dict[str, Input]:
        """{"image": uint8 [H, W, C]}: the autoencoder needs nothing else."""
        return {"image": Input("image", self.image_shape, doc="the image the autoencoder reconstructs")}

    def batch_arrays(self, ds):
        """{"image": uint8 [N, H, W, C]}."""
        return {"image": self.gather(ds)["image"]}

    def init_params(self, key, batch):
        return self.model.init(key, images_to_float(jnp.asarray(batch["image"][:1])))["params"]

    def loss_fn(self, params, batch, key):
        """batch["image"] uint8 [B, H, W, C]. Returns (rec + beta * kl, {"rec", "kl", "mse"})."""
        x = images_to_float(batch["image"])                                   # [B, H, W, C] in [-1, 1]
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        out, post = self.model.apply({"params": params}, x.astype(dtype), key=key, sample_posterior=True,
                                     return_posterior=True)
        err = out.astype(jnp.float32) - x
        mse = jnp.mean(err ** 2)
        rec = mse if self.config.objective.reconstruction == "mse" else jnp.mean(jnp.abs(err))
        latent_size = float(np.prod(post.mean.shape[1:]))
        kl = jnp.mean(post.kl().astype(jnp.float32)) / latent_size            # per latent element
        return rec + self.beta * kl, {"rec": rec, "kl": kl, "mse": mse,
                                      "posterior_std": jnp.mean(post.std.astype(jnp.float32))}

    # -- jitted pieces (used by the later stages and the run) ------------------------------------
    def fn(self, name: str):
        """Jitted ``fn(params, x)``: "moments" float [B, H, W, C] in [-1, 1] -> (mean, std)
        [B, h, w, c]; ``fn(params, z, scale)``: "decode" latents [B, h, w, c] divided by
        ``scale`` ([] float32) -> images [B, H, W, C] in [-1, 1]."""
        if name not in self._fns:
            if name == "moments":
                def f(p, x):
                    post = self.model.apply({"params": p}, x, method="encode")
                    return post.mean, post.std
            elif name == "decode":
                def f(p, z, scale):
                    return self.model.apply({"params": p}, z / scale, method="decode")
            else:
                raise KeyError(name)
            self._fns[name] = jax.jit(f)
        return self._fns[name]

    def moments(self, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, C] -> posterior (mean, std), float32 [N, h, w, c] each (unscaled)."""
        images = self.check_images(images)
        return map_chunked(lambda x: self.fn("moments")(params, images_to_float(x)), [images], CHUNK)

    def decode(self, params, latents: np.ndarray, scaling_factor: float = 1.0) -> np.ndarray:
        """Latents float [N, h, w, c] -> float32 images [N, H, W, C] in model space: decodes
        latents / scaling_factor (1: unscaled latents, e.g. posterior means)."""
        scale = jnp.float32(scaling_factor)
        return map_chunked(lambda z: self.fn("decode")(params, z, scale), [np.asarray(latents, np.float32)], CHUNK)

    def preview(self, params, batch):
        images = np.asarray(jax.device_get(batch["image"]))[:16]
        mean, _ = self.moments(params, images)
        recon = images_to_uint8(self.decode(params, mean))
        return make_grid(np.concatenate([images, recon]), ncol=len(images),
                         upscale=preview_upscale(images.shape[1]))


# ------------------------------------------------------------------------------------------------
# stage 3: the text-conditioned U-Net on latents
# ------------------------------------------------------------------------------------------------
class UNetStage(Task):
    """Stage "unet": ``UNet2DConditionModel`` on the frozen autoencoder's scaled latents,
    conditioned on the frozen text tower's hidden states (see the module docstring).

    Inputs: {"image": uint8 [H, W, C], "caption": text}. Batches: {"caption": int32 [B] (row of
    the context table), and either "latent_mean" / "latent_std" float32 [B, h, w, c]
    (diffusion.cache_latents) or "image" uint8 [B, H, W, C]}.
    """

    name = "ldm:unet"

    def __init__(self, config, parent: "LDMTask", vae_params, text_params):
        super().__init__(config)
        self.parent, self.vae_params, self.text_params = parent, vae_params, text_params
        self.cache_latents = bool(config.diffusion.cache_latents)
        self.context_table = None      # float32 [U + 1, 77, D]; the last row is the empty prompt
        self.captions: list[str] = []  # the U distinct training captions, in table order

    def inputs(self) -> dict[str, Input]:
        """{"image": uint8 [H, W, C], "caption": text}: the run's inputs (``LDMTask.inputs``)."""
        return self.parent.inputs()

    def example_batch(self):
        h, w, c = self.parent.latent_shape
        batch = {"caption": np.zeros((1,), np.int32)}
        if self.cache_latents:
            batch["latent_mean"] = np.zeros((1, h, w, c), np.float32)
            batch["latent_std"] = np.zeros((1, h, w, c), np.float32)
        else:
            batch["image"] = np.zeros((1, *self.parent.image_shape), np.uint8)
        return batch

    def init_params(self, key, batch):
        h, w, c = self.parent.latent_shape
        ctx = jnp.zeros((1, CONTEXT_LENGTH, self.parent.context_dim), jnp.float32)
        return self.model.init(key, jnp.zeros((1, h, w, c), jnp.float32), jnp.zeros((1,), jnp.int32),
                               ctx)["params"]

    def text_context(self, prompts: list[str]) -> np.ndarray:
        """The U-Net's context of each prompt, float32 [N, 77, D]: the frozen text tower through
        ``jaxgen.pipelines.stable_diffusion.encode_prompts`` (what the sampling pipeline feeds
        its U-Net)."""
        p = self.parent
        return encode_prompts(p.text_encoder, {"text_model": self.text_params["text_model"]}, p.tokenizer,
                              prompts, batch_size=CHUNK)

    def batch_arrays(self, ds):
        """Gather the inputs, encode the training set once with the frozen autoencoder (the
        scaling factor, and the latent cache with diffusion.cache_latents) and its distinct
        captions once with the frozen text tower. Returns the arrays of the class docstring."""
        fields = self.gather(ds)
        p = self.parent
        images = fields["image"]
        stats = self.config.diffusion.stats_images
        check_range("diffusion.stats_images", stats, 0, len(images),
                    hint="the training images the scaling factor is measured on; 0: all of them")
        k = int(stats) or len(images)
        mean, std = p.vae_stage.moments(self.vae_params, images if self.cache_latents else images[:k])
        p.set_scaling_factor(p.measure_scaling_factor(mean[:k], std[:k]), training=True)
        self.captions = sorted(set(fields["caption"]))
        index = {c: i for i, c in enumerate(self.captions)}
        self.context_table = jnp.asarray(self.text_context(self.captions + [""]))
        arrays = {"caption": np.asarray([index[c] for c in fields["caption"]], np.int32)}
        if self.cache_latents:
            arrays["latent_mean"], arrays["latent_std"] = mean, std
        else:
            arrays["image"] = images
        return arrays

    def loss_fn(self, params, batch, key):
        """Weighted MSE on the prediction target (module docstring); metrics {"mse"}."""
        if self.context_table is None:
            raise ConfigError("UNetStage.loss_fn needs batch_arrays(...) first (it builds the text "
                              "context table and the scaling factor).")
        p = self.parent
        k_z, k_t, k_eps, k_drop = jax.random.split(key, 4)
        if self.cache_latents:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            post = p.vae.apply({"params": self.vae_params}, images_to_float(batch["image"]), method="encode")
            mean, std = jax.lax.stop_gradient(post.mean), jax.lax.stop_gradient(post.std)
        z0 = (mean + std * jax.random.normal(k_z, mean.shape, jnp.float32)) * p.scaling_factor
        b = z0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, p.schedule.num_train_timesteps, jnp.int32)
        eps = jax.random.normal(k_eps, z0.shape, jnp.float32)
        zt = process.q_sample(p.schedule, z0, t, eps)
        drop = jax.random.bernoulli(k_drop, float(self.config.diffusion.caption_dropout), (b,))
        rows = jnp.where(drop, len(self.captions), batch["caption"])        # the last row: ""
        ctx = self.context_table[rows]                                       # [B, 77, D]
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        out = self.model.apply({"params": params}, zt.astype(dtype), t, ctx.astype(dtype)).astype(jnp.float32)
        target = process.training_target(p.schedule, p.prediction_type, z0, eps, t)
        per_example = jnp.mean((out - target) ** 2, axis=(1, 2, 3))          # [B]
        return jnp.mean(p.loss_weights(t) * per_example), {"mse": jnp.mean(per_example)}

    def preview(self, params, batch):
        prompts = [self.captions[i % len(self.captions)] for i in range(0, 16 * 7, 7)]
        images = self.parent.sample({"vae": self.vae_params, "text": self.text_params, "unet": params},
                                    len(prompts), prompts=prompts)
        return make_grid(images, ncol=8, upscale=preview_upscale(images.shape[1]))
