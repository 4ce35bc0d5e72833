"""Latent diffusion from scratch: a KL autoencoder, a CLIP text encoder, then a text-conditioned
U-Net on the autoencoder's latents, trained in order in one run directory (task "ldm").

Stages (``LDMTask.stages``; checkpoints in DIR/checkpoints/{vae,text,unet}):

* ``vae`` (``KLAutoencoderStage``): ``jaxgen.nn.vae:AutoencoderKL`` (the stage's ``model``) on
  images x in [-1, 1], with one posterior draw z ~ q(z|x) per image:
      loss = rec + objective.beta * kl
      rec  = mean over pixel values of (decode(z) - x)^2   (objective.reconstruction="mse")
             or of |decode(z) - x|                          ("l1")
      kl   = KL(q(z|x) || N(0, I)) per latent element (summed over an image's latent, divided by
             its h * w * c elements; mean over the batch)
* ``text`` (``jaxgen.training.tasks.clip.ClipTask``): a CLIPModel (the stage's ``model``) trained
  contrastively on the captions (with the dataset's phrasings when data.augment_captions), its
  BPE tokenizer learned from them and kept in DIR/tokenizer. Only its text tower is used later:
  the U-Net's cross-attention context is the tower's ``last_hidden_state`` over all 77 positions
  (what diffusers' StableDiffusionPipeline feeds its U-Net), frozen.
* ``unet`` (``UNetStage``): the run's top-level ``model``, a ``UNet2DConditionModel`` on latents
  z0 = scaling_factor * z (z ~ q(z|x), one draw per example and step):
      t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps
      context = text(caption), or text("") with probability diffusion.caption_dropout
      loss = mean_b w_b * mean (unet(z_t, t, context) - target)^2
  target eps / v / z0 per diffusion.prediction_type; w = 1 or min-SNR-gamma. The empty prompt
  is the unconditional input of classifier-free guidance, as in diffusers.

Scaling factor: diffusion.scaling_factor > 0 fixes it; 0 sets it from the data when the U-Net
stage starts: 1 / std of the training latents (one posterior draw per image, a fixed seed; the
standard deviation of all their values; the first diffusion.stats_images training images, 0 = all),
so z0 has unit variance. It is written to
DIR/latent_stats.json (with the latents' per-channel mean and std) and becomes the VAE config's
``scaling_factor`` (``LDMTask.vae``, the exported ``vae/config.json``).

Caches (the frozen stages never change, so these are exact): the text context of every distinct
training caption and of the empty prompt is computed once, float32 [U + 1, 77, D]; with
diffusion.cache_latents the posterior mean and std of every training image are computed once
(float32 [N, h, w, c] each) and each step draws z from them; without it each step runs the frozen
encoder on the batch.

The run (params = {"vae": ..., "text": ..., "unet": ...}):
    run.sample(num, seed=0, prompts=None, num_steps=None, guidance_scale=None, scheduler=None)
        -> uint8 [num, 32, 32, 3]; prompts: one str for all, or num of them (default: the 180
        canonical shapes captions in combination order, repeated); None settings take
        config.sampling's (the settings the targets are stated for).
    run.reconstruct(images uint8) -> uint8 (decode of the posterior mean); run.encode(images)
        -> scaled latents float32 [N, h, w, c]; run.decode(latents) -> uint8 images.
    run.encode_text(texts) / run.encode_image(images): the CLIP stage's embeddings.
``jaxgen.pipelines.export.export_stable_diffusion(run, folder)`` writes the stack as a diffusers
StableDiffusionPipeline folder (``python -m train.export``).

Evaluation (``python -m train.eval``): prompt adherence on all 180 attribute combinations
(eval.samples_per_prompt images each; the 18 held out of training reported apart), read back by
``jaxgen.data.shapes.adherence``; the autoencoder's reconstruction error and the attributes read
back from its reconstructions; a prompt -> image grid PNG.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data.pipeline import images_to_float, images_to_uint8
from jaxgen.diffusion import process
from jaxgen.diffusion.sampling import sample_loop
from jaxgen.diffusion.schedulers import Scheduler
from jaxgen.diffusion.schedules import make_schedule
from jaxgen.errors import CheckpointError, ConfigError, DataError
from jaxgen.eval.images import make_grid, prompt_grid_png, save_png
from jaxgen.nn.clip import CLIPTextModel
from jaxgen.nn.unet import UNet2DConditionModel
from jaxgen.nn.vae import AutoencoderKL
from jaxgen.training.tasks.base import Task
from jaxgen.training.tasks.clip import ClipTask
from jaxgen.training.tasks.diffusion import TrainingScheduleMixin, _plain
from jaxgen.training.trainer import stage_config

log = logging.getLogger("jaxgen")

STAGES = ("vae", "text", "unet")
RECONSTRUCTIONS = ("mse", "l1")
LATENT_STATS = "latent_stats.json"   # DIR/latent_stats.json: the scaling factor and latent moments
CONTEXT_LENGTH = 77                  # the U-Net's context: all 77 positions, as diffusers
STATS_SEED = 0                       # the posterior draws the scaling factor is measured on
CHUNK = 256                          # images per jitted encode / decode call
EVAL_SEED = 0


def _chunks(n: int, size: int):
    """(start, stop) pairs covering range(n) in blocks of ``size``."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    """x [n, ...] with n <= size, padded to [size, ...] by repeating its last row (one compiled
    shape for every chunk)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def _shapes_upscale(size: int) -> int:
    return 4 if size < 16 else 2


# ------------------------------------------------------------------------------------------------
# stage 1: the KL autoencoder
# ------------------------------------------------------------------------------------------------
class KLAutoencoderStage(Task):
    """Stage "vae": ``AutoencoderKL`` by reconstruction + beta * KL (see the module docstring).

    Batches: {"image": uint8 [B, H, W, C]}.
    """

    name = "ldm:vae"

    def __init__(self, config):
        super().__init__(config)
        if not isinstance(self.model, AutoencoderKL):
            raise ConfigError(f"stages.vae.model_class={config.model_class!r}: the ldm task's "
                              "autoencoder stage trains jaxgen.nn.vae:AutoencoderKL.")
        o = config.objective
        if o.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"stages.vae.objective.reconstruction={o.reconstruction!r}: choose one of "
                              f"{', '.join(RECONSTRUCTIONS)}.")
        if not float(o.beta) >= 0:
            raise ConfigError(f"stages.vae.objective.beta={o.beta} must be >= 0.")
        self.beta = float(o.beta)
        self._fns: dict = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = self.model.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return int(h), int(w), int(self.model.in_channels)

    def batch_arrays(self, ds):
        """{"image": uint8 [N, H, W, C]} (the autoencoder needs nothing else)."""
        return {"image": self.check_images(ds.images)}

    def check_images(self, images):
        images = np.asarray(images)
        want = self.image_shape
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise DataError(f"images have shape {images.shape}; this run takes uint8 [N, {want[0]}, "
                            f"{want[1]}, {want[2]}] (NHWC at the dataset's resolution).")
        if images.dtype != np.uint8:
            raise DataError(f"images have dtype {images.dtype}; pass uint8 in [0, 255].")
        return images

    def example_batch(self):
        return {"image": np.zeros((1, *self.image_shape), np.uint8)}

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
        [B, h, w, c]; "decode" unscaled latents [B, h, w, c] -> images [B, H, W, C] in [-1, 1]."""
        if name not in self._fns:
            if name == "moments":
                def f(p, x):
                    post = self.model.apply({"params": p}, x, method="encode")
                    return post.mean, post.std
            elif name == "decode":
                def f(p, z):
                    return self.model.apply({"params": p}, z, method="decode")
            else:
                raise KeyError(name)
            self._fns[name] = jax.jit(f)
        return self._fns[name]

    def moments(self, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, C] -> posterior (mean, std), float32 [N, h, w, c] each (unscaled)."""
        images = self.check_images(images)
        means, stds = [], []
        size = min(CHUNK, len(images))
        for a, b in _chunks(len(images), size):
            m, s = self.fn("moments")(params, images_to_float(_padded(images[a:b], size)))
            means.append(np.asarray(m)[:b - a])
            stds.append(np.asarray(s)[:b - a])
        return np.concatenate(means), np.concatenate(stds)

    def decode(self, params, latents: np.ndarray) -> np.ndarray:
        """Unscaled latents float [N, h, w, c] -> float32 images [N, H, W, C] in model space."""
        latents = np.asarray(latents, np.float32)
        size = min(CHUNK, len(latents))
        out = [np.asarray(self.fn("decode")(params, _padded(latents[a:b], size)))[:b - a]
               for a, b in _chunks(len(latents), size)]
        return np.concatenate(out)

    def preview(self, params, batch):
        images = np.asarray(jax.device_get(batch["image"]))[:16]
        mean, _ = self.moments(params, images)
        recon = images_to_uint8(self.decode(params, mean))
        return make_grid(np.concatenate([images, recon]), ncol=len(images),
                         upscale=_shapes_upscale(images.shape[1]))


# ------------------------------------------------------------------------------------------------
# stage 3: the text-conditioned U-Net on latents
# ------------------------------------------------------------------------------------------------
class UNetStage(Task):
    """Stage "unet": ``UNet2DConditionModel`` on the frozen autoencoder's scaled latents,
    conditioned on the frozen text tower's hidden states (see the module docstring).

    Batches: {"caption": int32 [B] (row of the context table), and either "latent_mean" /
    "latent_std" float32 [B, h, w, c] (diffusion.cache_latents) or "image" uint8 [B, H, W, C]}.
    """

    name = "ldm:unet"

    def __init__(self, config, parent: "LDMTask", vae_params, text_params):
        super().__init__(config)
        self.parent, self.vae_params, self.text_params = parent, vae_params, text_params
        self.cache_latents = bool(config.diffusion.cache_latents)
        self.context_table = None      # float32 [U + 1, 77, D]; the last row is the empty prompt
        self.captions: list[str] = []  # the U distinct training captions, in table order

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

    def batch_arrays(self, ds):
        """Encode the training set once with the frozen autoencoder (the scaling factor, and the
        latent cache with diffusion.cache_latents) and its distinct captions once with the frozen
        text tower. Returns the arrays of the class docstring."""
        if ds.captions is None:
            raise DataError(f"{ds.name}/{ds.split} has no captions; the text-to-image stage needs "
                            "captioned images.")
        p = self.parent
        images = p.vae_stage.check_images(ds.images)
        k = int(self.config.diffusion.stats_images) or len(images)
        if not 0 < k <= len(images):
            raise ConfigError(f"diffusion.stats_images={k}: measure the scaling factor on 1..{len(images)} "
                              "training images (0: all of them).")
        mean, std = p.vae_stage.moments(self.vae_params, images if self.cache_latents else images[:k])
        p.set_scaling_factor(p.measure_scaling_factor(mean[:k], std[:k]), training=True)
        self.captions = sorted(set(ds.captions))
        index = {c: i for i, c in enumerate(self.captions)}
        self.context_table = jnp.asarray(p.text_context(self.text_params, self.captions + [""]))
        arrays = {"caption": np.asarray([index[c] for c in ds.captions], np.int32)}
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
        return make_grid(images, ncol=8, upscale=_shapes_upscale(images.shape[1]))


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
class LDMTask(TrainingScheduleMixin, Task):
    """The three-stage latent diffusion run (module docstring). ``model`` is the U-Net;
    ``vae`` (with the run's scaling factor), ``text_encoder`` and ``tokenizer`` the rest of the
    stack."""

    name = "ldm"
    stages = STAGES

    def __init__(self, config):
        super().__init__(config)
        if "stages" not in config or any(s not in config.stages for s in STAGES):
            raise ConfigError(f"an ldm config has config.stages with entries {', '.join(STAGES)} "
                              "(see configs/shapes_ldm.py).")
        if not isinstance(self.model, UNet2DConditionModel):
            raise ConfigError(f"model_class={config.model_class!r}: the ldm task's denoiser is "
                              "jaxgen.nn.unet:UNet2DConditionModel.")
        self.vae_stage = KLAutoencoderStage(stage_config(config, "vae"))
        self.text_stage = ClipTask(stage_config(config, "text"))
        self.vae = self.vae_stage.model
        self.text_encoder = CLIPTextModel(**dict(self.text_stage.model.text_config))
        self._check_shapes()
        d = config.diffusion
        self.check_objective(d)
        if not 0.0 <= float(d.caption_dropout) < 1.0:
            raise ConfigError(f"diffusion.caption_dropout={d.caption_dropout} must be in [0, 1) "
                              "(0.1 is usual; > 0 is needed for classifier-free guidance).")
        if float(d.scaling_factor) < 0:
            raise ConfigError(f"diffusion.scaling_factor={d.scaling_factor}: give a positive factor, or 0 "
                              "to set it from the training latents.")
        if self.prediction_type == "epsilon" and bool(d.rescale_betas_zero_snr):
            raise ConfigError("diffusion.rescale_betas_zero_snr=True with prediction_type='epsilon': at "
                              "alpha_bar = 0 the noise says nothing about z0. Use v_prediction.")
        self.schedule = make_schedule(d.beta_schedule, d.num_train_timesteps, d.beta_start, d.beta_end,
                                      rescale_betas_zero_snr=bool(d.rescale_betas_zero_snr))
        self.scaling_factor: float | None = float(d.scaling_factor) or None
        if self.scaling_factor is not None:
            self.vae = self.vae.clone(scaling_factor=self.scaling_factor)
        self.latent_stats: dict | None = None
        self._workdir: str | None = None
        self._training = False
        self._fns: dict = {}
        self._sched_cache: dict = {}

    # -- shapes ------------------------------------------------------------------------------
    def _check_shapes(self) -> None:
        u, v = self.model, self.vae
        hidden = self.text_stage.model.text_config["hidden_size"]
        cross = u.cross_attention_dim if isinstance(u.cross_attention_dim, int) else u.cross_attention_dim[0]
        if cross != hidden:
            raise ConfigError(f"model.cross_attention_dim={u.cross_attention_dim} but the text tower's "
                              f"hidden_size is {hidden}: set model.cross_attention_dim={hidden}.")
        if u.in_channels != v.latent_channels or u.out_channels != v.latent_channels:
            raise ConfigError(f"the U-Net has in/out_channels {u.in_channels}/{u.out_channels} but the "
                              f"autoencoder's latent_channels is {v.latent_channels}: set model.in_channels "
                              f"= model.out_channels = {v.latent_channels}.")
        h, w, _ = self.latent_shape
        size = u.sample_size
        if size is not None and tuple((size, size) if isinstance(size, int) else size) != (h, w):
            raise ConfigError(f"model.sample_size={size} but the autoencoder's latents are {h}x{w} "
                              f"(image {self.image_shape[0]} / factor {self.vae_factor}): set "
                              f"model.sample_size={h}.")
        if self.text_stage.text_cfg["max_position_embeddings"] != CONTEXT_LENGTH:
            raise ConfigError(f"the text tower must take {CONTEXT_LENGTH} positions (diffusers' context).")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the run's images."""
        return self.vae_stage.image_shape

    @property
    def vae_factor(self) -> int:
        """The autoencoder's downsampling factor f = 2 ** (levels - 1)."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, c) of the latents: (H / f, W / f, latent_channels)."""
        h, w, _ = self.image_shape
        return h // self.vae_factor, w // self.vae_factor, int(self.vae.latent_channels)

    @property
    def context_dim(self) -> int:
        return int(self.text_stage.model.text_config["hidden_size"])

    # -- stages and files -----------------------------------------------------------------------
    def attach(self, workdir: str, training: bool) -> None:
        """The tokenizer (learned from the captions, kept in DIR/tokenizer) and, once the U-Net
        stage has started, DIR/latent_stats.json (the scaling factor)."""
        self._workdir, self._training = os.path.abspath(workdir), training
        self.text_stage.attach(workdir, training)
        path = os.path.join(self._workdir, LATENT_STATS)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.latent_stats = json.load(f)
            self.set_scaling_factor(float(self.latent_stats["scaling_factor"]), training=False)

    def stage_task(self, stage, frozen, config):
        """vae -> KLAutoencoderStage, text -> ClipTask (both built from stage_config(run config,
        stage), which is what ``config`` is), unet -> UNetStage with the frozen vae and text params."""
        if stage == "vae":
            return self.vae_stage
        if stage == "text":
            return self.text_stage
        if stage == "unet":
            missing = [s for s in ("vae", "text") if s not in frozen]
            if missing:
                raise CheckpointError(f"the U-Net stage needs the finished {', '.join(missing)} stage(s).")
            if not self._training and self.scaling_factor is None:
                raise CheckpointError(f"{self._workdir}/{LATENT_STATS} is missing: it holds the latent "
                                      "scaling factor the U-Net was trained with. Copy the run directory "
                                      "whole, or resume training to write it.")
            return UNetStage(config, self, frozen["vae"], frozen["text"])
        raise ConfigError(f"the ldm task has stages {', '.join(STAGES)}, not {stage!r}.")

    def measure_scaling_factor(self, mean: np.ndarray, std: np.ndarray) -> float:
        """1 / std of the training latents (one posterior draw per image, seed STATS_SEED), or the
        config's fixed diffusion.scaling_factor. Records the latents' moments in self.latent_stats.
        mean, std: float32 [N, h, w, c] posterior moments."""
        z = mean.astype(np.float64) + std.astype(np.float64) * np.random.default_rng(STATS_SEED).standard_normal(mean.shape)
        measured = 1.0 / float(z.std())
        fixed = float(self.config.diffusion.scaling_factor)
        self.latent_stats = {
            "scaling_factor": fixed or measured,
            "measured_scaling_factor": measured,
            "num_images": int(len(mean)),
            "channel_mean": z.mean(axis=(0, 1, 2)).tolist(),
            "channel_std": z.std(axis=(0, 1, 2)).tolist(),
            "posterior_std_mean": float(std.mean()),
        }
        return fixed or measured

    def set_scaling_factor(self, value: float, training: bool) -> None:
        """Use ``value`` as the latent scaling factor; while training, write DIR/latent_stats.json
        (process 0), or check it against the one a resumed run wrote."""
        if not value > 0 or not np.isfinite(value):
            raise DataError(f"latent scaling factor {value}: the training latents are degenerate "
                            "(all equal?); check the autoencoder stage.")
        if training and self._workdir is not None:
            path = os.path.join(self._workdir, LATENT_STATS)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    saved = float(json.load(f)["scaling_factor"])
                if not np.isclose(saved, value, rtol=1e-4):
                    raise ConfigError(f"{path} says scaling_factor={saved}, but the autoencoder's latents "
                                      f"now give {value} (did the data or the vae stage change?). Resume with "
                                      "the same run, or train in a new --workdir.")
                value = saved
            elif jax.process_index() == 0:
                fd, tmp = tempfile.mkstemp(prefix=".latent_stats-", dir=self._workdir)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self.latent_stats, f, indent=2)
                os.replace(tmp, path)   # atomic
        self.scaling_factor = float(value)
        self.vae = self.vae.clone(scaling_factor=self.scaling_factor)

    def _require_scaling(self) -> float:
        if self.scaling_factor is None:
            raise CheckpointError("this run has no latent scaling factor yet: the U-Net stage has not "
                                  "started. Train the run to the end (the same python -m train command).")
        return self.scaling_factor

    @property
    def tokenizer(self):
        return self.text_stage.tokenizer

    def tokenizer_for(self, workdir: str):
        return self.text_stage.tokenizer_for(workdir)

    # -- diffusion pieces -----------------------------------------------------------------------
    # -- the stack, jitted ----------------------------------------------------------------------
    def _fn(self, name: str):
        if name not in self._fns:
            if name == "text":
                def f(p, ids):   # int32 [B, 77] -> float32 [B, 77, D]
                    out = self.text_encoder.apply({"params": {"text_model": p["text_model"]}}, ids)
                    return out.last_hidden_state.astype(jnp.float32)
            elif name == "decode":
                def f(p, z, scale):   # scaled latents [B, h, w, c] -> images [B, H, W, C] in [-1, 1]
                    return self.vae.apply({"params": p}, z / scale, method="decode")
            else:
                raise KeyError(name)
            self._fns[name] = jax.jit(f)
        return self._fns[name]

    def text_context(self, text_params, prompts: Sequence[str]) -> np.ndarray:
        """The U-Net's context of each prompt: float32 [N, 77, D], the text tower's last hidden
        state over the 77 ids (padded with the end token), as diffusers' pipeline computes it."""
        ids = self.tokenizer(list(prompts))                                  # int32 [N, 77]
        size = min(CHUNK, len(ids))
        return np.concatenate([np.asarray(self._fn("text")(text_params, _padded(ids[a:b], size)))[:b - a]
                               for a, b in _chunks(len(ids), size)])

    def decode_latents(self, vae_params, latents) -> np.ndarray:
        """Scaled latents float [N, h, w, c] -> float32 images [N, H, W, C] in [-1, 1] (unclipped):
        the VAE decodes latents / scaling_factor."""
        scale = jnp.float32(self._require_scaling())
        latents = np.asarray(latents, np.float32)
        size = min(CHUNK, len(latents))
        return np.concatenate([np.asarray(self._fn("decode")(vae_params, _padded(latents[a:b], size), scale))[:b - a]
                               for a, b in _chunks(len(latents), size)])

    def sampler(self, scheduler: Scheduler, num_steps: int, guided: bool):
        """Jitted fn(unet_params, x_init, ctx, uncond, key, guidance) -> z0 [B, h, w, c]: the
        whole loop (one lax.scan). Cached per (scheduler, steps, guided)."""
        cache_key = ("sampler", scheduler, int(num_steps), bool(guided))
        if cache_key not in self._fns:
            state = scheduler.set_timesteps(int(num_steps))

            def run(unet_params, x_init, ctx, uncond, key, guidance):
                def model_fn(x_in, t, c):
                    tt = jnp.broadcast_to(t, (x_in.shape[0],))
                    return self.model.apply({"params": unet_params}, x_in, tt, c).astype(jnp.float32)

                return sample_loop(scheduler, state, model_fn, x_init, key=key, cond=ctx,
                                   uncond=uncond if guided else None,
                                   guidance_scale=guidance if guided else 1.0)

            self._fns[cache_key] = jax.jit(run)
        return self._fns[cache_key]

    def generate_latents(self, params, prompts: Sequence[str], x_init, num_steps=None,
                         guidance_scale=None, scheduler=None, key=None) -> np.ndarray:
        """The final (scaled) latents for ``prompts`` from given initial noise.

        params: {"vae", "text", "unet"}; prompts: N str; x_init: float [N, h, w, c] unit Gaussian
        noise (multiplied by the scheduler's init_noise_sigma inside, as diffusers does with
        ``latents=``); key: the per-step noise of stochastic schedulers (default key(0)).
        Runs in chunks of config.sampling.batch_size. Returns float32 [N, h, w, c].
        """
        s = self.config.sampling
        sched = self.make_scheduler(scheduler)
        steps = int(s.num_steps if num_steps is None else num_steps)
        g = float(s.guidance_scale if guidance_scale is None else guidance_scale)
        prompts = list(prompts)
        x_init = np.asarray(x_init, np.float32)
        if x_init.shape != (len(prompts), *self.latent_shape):
            raise DataError(f"x_init has shape {x_init.shape}; pass float [N={len(prompts)}, "
                            f"{', '.join(map(str, self.latent_shape))}] unit Gaussian noise.")
        guided = g != 1.0
        ctx = self.text_context(params["text"], prompts)                     # [N, 77, D]
        uncond = self.text_context(params["text"], [""])                     # [1, 77, D]
        key = jax.random.key(0) if key is None else key
        size = min(int(s.batch_size), len(prompts))
        fn = self.sampler(sched, steps, guided)
        out = []
        for n, (a, b) in enumerate(_chunks(len(prompts), size)):
            c = _padded(ctx[a:b], size)
            z = fn(params["unet"], jnp.asarray(_padded(x_init[a:b], size)), jnp.asarray(c),
                   jnp.asarray(np.repeat(uncond, size, axis=0)), jax.random.fold_in(key, n), jnp.float32(g))
            out.append(np.asarray(z)[:b - a])
        return np.concatenate(out)

    def default_prompts(self, num: int) -> list[str]:
        """The canonical captions of the dataset's combinations in order (shapes: 180), repeated."""
        if self.config.data.name != "shapes":
            raise DataError("prompts=None: the ldm task has default prompts only for shapes; pass prompts=.")
        from jaxgen.data import shapes

        k = shapes.NUM_COMBINATIONS
        return [shapes.caption(**shapes.combination_attributes(i % k)) for i in range(num)]

    def sample(self, params, num, seed=0, labels=None, prompts=None, num_steps=None,
               guidance_scale=None, scheduler=None):
        """``num`` images for ``prompts``, uint8 [num, H, W, C] (module docstring).

        The initial noise is normal(fold_in(key(seed), 0), [num, h, w, c]); stochastic schedulers
        take per-step noise from fold_in(key(seed), 1).
        """
        if labels is not None:
            raise DataError("this run is text-conditioned: pass prompts=, not labels.")
        num = int(num)
        if num < 1:
            raise DataError(f"num={num}: ask for at least one sample.")
        if prompts is None:
            prompts = self.default_prompts(num)
        elif isinstance(prompts, str):
            prompts = [prompts] * num
        else:
            prompts = list(prompts)
            if len(prompts) == 1:
                prompts = prompts * num
            if len(prompts) != num:
                raise DataError(f"{len(prompts)} prompts for num={num} images: pass one prompt, or one per image.")
        if not all(isinstance(p, str) for p in prompts):
            raise DataError("prompts must be strings.")
        key = jax.random.key(seed)
        x_init = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (num, *self.latent_shape), jnp.float32))
        z = self.generate_latents(params, prompts, x_init, num_steps, guidance_scale, scheduler,
                                  key=jax.random.fold_in(key, 1))
        return images_to_uint8(self.decode_latents(params["vae"], z))

    # -- autoencoder and CLIP abilities ---------------------------------------------------------
    def encode(self, params, images) -> np.ndarray:
        """uint8 [N, H, W, C] -> scaled latents (posterior mean * scaling_factor) float32 [N, h, w, c]."""
        mean, _ = self.vae_stage.moments(params["vae"], images)
        return mean * np.float32(self._require_scaling())

    def decode(self, params, latents) -> np.ndarray:
        """Scaled latents float [N, h, w, c] -> uint8 [N, H, W, C]."""
        return images_to_uint8(self.decode_latents(params["vae"], latents))

    def reconstruct(self, params, images) -> np.ndarray:
        """uint8 [N, H, W, C] -> uint8 [N, H, W, C]: decode of the posterior mean."""
        mean, _ = self.vae_stage.moments(params["vae"], images)
        return images_to_uint8(self.vae_stage.decode(params["vae"], mean))

    def encode_text(self, params, texts) -> np.ndarray:
        return self.text_stage.encode_text(params["text"], texts)

    def encode_image(self, params, images) -> np.ndarray:
        return self.text_stage.encode_image(params["text"], images)

    # -- export ---------------------------------------------------------------------------------
    def pipeline_components(self, params) -> dict[str, Any]:
        """What a diffusers StableDiffusionPipeline folder holds: {"unet", "vae", "text_encoder":
        (module, params); "tokenizer": CLIPTokenizer; "scheduler": the default jaxgen scheduler}.
        The VAE module carries the run's scaling_factor."""
        self._require_scaling()
        return {"unet": (self.model, params["unet"]),
                "vae": (self.vae, params["vae"]),
                "text_encoder": (self.text_encoder, {"text_model": params["text"]["text_model"]}),
                "tokenizer": self.tokenizer,
                "scheduler": self.make_scheduler(None)}

    # -- evaluation -----------------------------------------------------------------------------
    def prompt_adherence(self, run, samples_per_prompt: int, seed: int = EVAL_SEED, **sampling) -> dict:
        """Sample every one of the 180 canonical prompts ``samples_per_prompt`` times and read the
        attributes back (jaxgen.data.shapes.adherence). Returns ({"all_combinations": {...},
        "trained_combinations": {...}, "heldout_combinations": {...}} with accuracies of shape,
        color, size, position and "all" in [0, 1], the images uint8 [180 * k, H, W, C] in
        combination-major order)."""
        from jaxgen.data import shapes

        k = shapes.NUM_COMBINATIONS
        combos = np.repeat(np.arange(k), samples_per_prompt)                 # [k * n]
        attrs = shapes.combination_attributes(combos)
        prompts = [shapes.caption(*(int(attrs[a][i]) for a in shapes.ATTRIBUTES)) for i in range(len(combos))]
        t0 = time.perf_counter()
        images = run.sample(len(prompts), seed=seed, prompts=prompts, **sampling)
        seconds = time.perf_counter() - t0
        held = np.isin(combos, np.asarray(shapes.HELDOUT_COMBINATIONS))
        out = {"all_combinations": shapes.adherence(images, attrs),
               "trained_combinations": shapes.adherence(images[~held], {a: v[~held] for a, v in attrs.items()}),
               "heldout_combinations": shapes.adherence(images[held], {a: v[held] for a, v in attrs.items()}),
               "num_images": int(len(images)), "seconds_incl_compile": seconds}
        return out, images

    def evaluate(self, run, out_dir):
        """Metrics of the module docstring; PNGs into out_dir (prompt_grid.png, all_prompts.png,
        reconstructions.png)."""
        from jaxgen.data import shapes

        e, s = self.config.eval, self.config.sampling
        test = self.vae_stage.load_data(self.config.data.eval_split)
        recon = run.reconstruct(test.images)
        out: dict[str, Any] = {
            "sampling_default": {"scheduler": s.scheduler, "num_steps": int(s.num_steps),
                                 "guidance_scale": float(s.guidance_scale)},
            "scaling_factor": self._require_scaling(),
            "vae_test_mse": float(np.mean((recon / 255.0 - test.images / 255.0) ** 2)),
            "vae_test_reconstruction_adherence": shapes.adherence(recon, test.attributes),
        }
        up = _shapes_upscale(test.images.shape[1])
        save_png(os.path.join(out_dir, "reconstructions.png"),
                 make_grid(np.concatenate([test.images[:16], recon[:16]]), ncol=16, upscale=up))
        n = int(e.samples_per_prompt)
        adherence, images = self.prompt_adherence(run, n)
        out.update({f"adherence_{k}": v for k, v in adherence.items()})
        # one image of every combination, 18 rows of 10 (combination order)
        save_png(os.path.join(out_dir, "all_prompts.png"), make_grid(images[::n], ncol=10, upscale=up))
        grid_prompts = list(_plain(e.grid_prompts))
        grid = run.sample(len(grid_prompts) * 8, seed=EVAL_SEED + 1,
                          prompts=[p for p in grid_prompts for _ in range(8)])
        prompt_grid_png(os.path.join(out_dir, "prompt_grid.png"), grid_prompts, grid, per_prompt=8)
        all_ = adherence["all_combinations"]
        out["target_color_0.9_met"] = bool(all_["color"] >= 0.9)
        out["target_shape_0.7_met"] = bool(all_["shape"] >= 0.7)
        for g in _plain(e.guidance_scales):
            res, _ = self.prompt_adherence(run, n, guidance_scale=float(g))
            out.setdefault("by_guidance", {})[f"{float(g):g}"] = {
                k: res[k] for k in ("all_combinations", "heldout_combinations")}
        return out
