"""Latent diffusion from scratch: a KL autoencoder, a CLIP text encoder, then a text-conditioned
U-Net on the autoencoder's latents, trained in order in one run directory (task "ldm").

Where things are:
    jaxgen/training/tasks/ldm.py          this file: LDMTask, the run (stages chained, the latent
                                          scaling factor, sampling through the pipeline, the Run's
                                          abilities, the export's components, evaluation)
    jaxgen/training/tasks/ldm_stages.py   the stages it trains itself: KLAutoencoderStage ("vae")
                                          and UNetStage ("unet"), their objectives and caches
    jaxgen/pipelines/stable_diffusion.py  the sampler: run.sample is a StableDiffusionPipeline
    jaxgen/eval/shapes.py                 prompt adherence over the 180 shapes combinations
    jaxgen/pipelines/export.py            the run as a diffusers StableDiffusionPipeline folder

Stages (``LDMTask.stages``; checkpoints in DIR/checkpoints/{vae,text,unet}):

* ``vae`` (``ldm_stages.KLAutoencoderStage``): ``jaxgen.nn.vae:AutoencoderKL`` by reconstruction
  + beta * KL, one posterior draw per image.
* ``text`` (``jaxgen.training.tasks.clip.ClipTask``): a CLIPModel (the stage's ``model``) trained
  contrastively on the captions (with the dataset's phrasings when data.augment_captions), its
  BPE tokenizer learned from them and kept in DIR/tokenizer. Only its text tower is used later:
  the U-Net's cross-attention context is the tower's ``last_hidden_state`` over all 77 positions
  (what diffusers' StableDiffusionPipeline feeds its U-Net), frozen.
* ``unet`` (``ldm_stages.UNetStage``): the run's top-level ``model``, a ``UNet2DConditionModel``
  on the scaled latents of the frozen autoencoder, conditioned on the frozen text tower; the empty
  prompt is the unconditional input of classifier-free guidance, as in diffusers.

Scaling factor: diffusion.scaling_factor > 0 fixes it; 0 sets it from the data when the U-Net
stage starts: 1 / std of the training latents (one posterior draw per image, a fixed seed; the
standard deviation of all their values; the first diffusion.stats_images training images, 0 = all),
so z0 has unit variance. It is written to
DIR/latent_stats.json (with the latents' per-channel mean and std) and becomes the VAE config's
``scaling_factor`` (``LDMTask.vae``, the exported ``vae/config.json``).

The run (params = {"vae": ..., "text": ..., "unet": ...}; ``LDMTask.abilities``):
    run.sample(num, seed=0, prompts=None, num_steps=None, guidance_scale=None, scheduler=None)
        -> uint8 [num, 32, 32, 3]; prompts: one str for all, or num of them (default: the 180
        canonical shapes captions in combination order, repeated); None settings take
        config.sampling's (the settings the targets are stated for).
    run.reconstruct(images uint8) -> uint8 (decode of the posterior mean); run.encode(images)
        -> scaled latents float32 [N, h, w, c]; run.decode(latents) -> uint8 images.
    run.encode_text(texts) / run.encode_image(images): the CLIP stage's embeddings.
``jaxgen.pipelines.export.export_stable_diffusion(run, folder)`` writes the stack as a diffusers
StableDiffusionPipeline folder (``python -m train.export``).

Sampling is ``jaxgen.StableDiffusionPipeline`` over the run's own stack (``LDMTask.pipeline``, the
components the export writes), so the run, the exported folder in jaxgen and the folder in
diffusers run one sampler. ``run.sample``: initial latents normal(fold_in(key(seed), 0),
[num, h, w, c]) (the pipeline's ``latents=``), in chunks of config.sampling.batch_size images, one
pipeline call per chunk; images are the pipeline's float [0, 1] output as round(x * 255) uint8.
What that means:
* Guidance follows the pipeline (and diffusers): classifier-free guidance only when
  guidance_scale > 1; a scale <= 1 runs the conditional pass alone. (The task's own loop before
  guided at any scale != 1, so a scale below 1 extrapolated away from the prompt; it no longer
  does.)
* Per-step noise of stochastic schedulers (DDPM, Euler ancestral, DDIM with eta, ...) comes from
  the pipeline's seed mechanism: chunk n is called with seed = fold_in(fold_in(key(seed), 1), n)
  (a typed key), and the pipeline draws step i's noise from fold_in(fold_in(that, 3), i). (The
  task's own loop drew it from fold_in(fold_in(fold_in(key(seed), 1), n), i): deterministic
  schedulers such as the default DDIM are unaffected.)

Evaluation (``python -m train.eval``, ``LDMTask.evaluate`` with ``jaxgen.eval.shapes``): prompt
adherence on all 180 attribute combinations (eval.samples_per_prompt images each; the 18 held out
of training reported apart), read back by ``jaxgen.data.shapes.adherence``; the autoencoder's
reconstruction error and the attributes read back from its reconstructions; a prompt -> image
grid PNG.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data.chunks import chunk_bounds, pad_rows
from jaxgen.data.fields import Input
from jaxgen.data.pipeline import images_to_uint8, unit_to_uint8
from jaxgen.diffusion.schedules import make_schedule
from jaxgen.errors import CheckpointError, ConfigError, DataError
from jaxgen.eval import shapes as shapes_eval
from jaxgen.nn.clip import CLIPTextModel
from jaxgen.nn.unet import UNet2DConditionModel
from jaxgen.pipelines.stable_diffusion import StableDiffusionPipeline
from jaxgen.training.config_values import check_range, plain
from jaxgen.training.tasks.base import Task
from jaxgen.training.tasks.clip import ClipTask
from jaxgen.training.tasks.diffusion import TrainingScheduleMixin
from jaxgen.training.tasks.ldm_stages import CONTEXT_LENGTH, KLAutoencoderStage, UNetStage
from jaxgen.training.stages import stage_config

log = logging.getLogger("jaxgen")

STAGES = ("vae", "text", "unet")
LATENT_STATS = "latent_stats.json"   # DIR/latent_stats.json: the scaling factor and latent moments
STATS_SEED = 0                       # the posterior draws the scaling factor is measured on
_KEY_LATENTS, _KEY_STEPS = 0, 1      # run.sample: fold_in(key(seed), purpose)

__all__ = ["LDMTask", "KLAutoencoderStage", "UNetStage", "STAGES"]


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
class LDMTask(TrainingScheduleMixin, Task):
    """The three-stage latent diffusion run (module docstring). ``model`` is the U-Net;
    ``vae`` (with the run's scaling factor), ``text_encoder`` and ``tokenizer`` the rest of the
    stack."""

    name = "ldm"
    stages = STAGES
    # the Run's methods: each a method fn(variables, ...) below (run.tokenizer: tokenizer_for)
    abilities = ("sample", "encode", "decode", "reconstruct", "encode_text", "encode_image", "tokenizer",
                 "prompt_to_prompt")

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
        check_range("diffusion.caption_dropout", d.caption_dropout, 0.0, 1.0, high_open=True,
                    hint="0.1 is usual; > 0 is needed for classifier-free guidance")
        check_range("diffusion.scaling_factor", d.scaling_factor, 0.0,
                    hint="a positive factor, or 0 to set it from the training latents")
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
        self._sched_cache: dict = {}
        self._pipeline: tuple | None = None   # (params, vae module, pipeline) of the last sample call

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

    def inputs(self) -> dict[str, Input]:
        """What one training example of the run needs: {"image": uint8 [H, W, C], "caption":
        text} (the U-Net stage's inputs; the autoencoder stage uses the image only)."""
        return {"image": Input("image", self.image_shape, doc="the training image"),
                "caption": Input("text", doc="its caption: the U-Net is conditioned on the text "
                                             "tower's hidden states of it")}

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

    # -- sampling: the run's stack as a StableDiffusionPipeline -----------------------------------
    def pipeline(self, params) -> StableDiffusionPipeline:
        """The run's stack as a ``jaxgen.StableDiffusionPipeline`` (the components of
        ``pipeline_components``: what the export writes), for params {"vae", "text", "unet"}.
        Cached for the params last asked for (by identity, with the VAE module carrying the
        scaling factor); the compiled programs are shared by every pipeline with these modules."""
        cached = self._pipeline
        if cached is not None and cached[0] is params and cached[1] is self.vae:
            return cached[2]
        c = self.pipeline_components(params)
        pipe = StableDiffusionPipeline(c["unet"][0], c["vae"][0], c["text_encoder"][0],
                                       {k: c[k][1] for k in ("unet", "vae", "text_encoder")},
                                       c["tokenizer"], c["scheduler"])
        self._pipeline = (params, self.vae, pipe)
        return pipe

    def sample(self, params, num, seed=0, labels=None, prompts=None, num_steps=None,
               guidance_scale=None, scheduler=None):
        """``num`` images for ``prompts``, uint8 [num, H, W, C] (module docstring: "Sampling").

        prompts: None (the shapes captions in combination order), one str, or num str.
        scheduler: None (config.sampling.scheduler), a diffusers class name, or a jaxgen
        Scheduler matching the training schedule. The initial latents are
        normal(fold_in(key(seed), 0), [num, h, w, c]); chunk n of config.sampling.batch_size
        images is one pipeline call with seed fold_in(fold_in(key(seed), 1), n).
        """
        if labels is not None:
            raise DataError("this run is text-conditioned: pass prompts=, not labels.")
        prompts = self.sample_prompts(num, prompts)
        s = self.config.sampling
        sched = self.make_scheduler(scheduler)
        steps = int(s.num_steps if num_steps is None else num_steps)
        g = float(s.guidance_scale if guidance_scale is None else guidance_scale)
        return self.pipeline_samples(self.pipeline(params), prompts, seed, steps, g, sched)

    def prompt_to_prompt(self, params, source_prompts, edit_prompts, seed=0, **options):
        """Prompt-to-Prompt edits of run.sample's images: (sources, edits) uint8 [N, H, W, C];
        options as StableDiffusionPipeline.prompt_to_prompt, None = config.sampling's
        (jaxgen.pipelines.prompt_to_prompt.run_prompt_to_prompt)."""
        from jaxgen.pipelines.prompt_to_prompt import run_prompt_to_prompt

        return run_prompt_to_prompt(self, params, source_prompts, edit_prompts, seed=seed, **options)

    def sample_prompts(self, num, prompts) -> list[str]:
        """``num`` prompts from run.sample's ``prompts``: None (the shapes captions in combination
        order), one str for all, or num str; a DataError otherwise."""
        num = int(num)
        if num < 1:
            raise DataError(f"num={num}: ask for at least one sample.")
        if prompts is None:
            return self.default_prompts(num)
        if isinstance(prompts, str):
            return [prompts] * num
        prompts = list(prompts)
        if len(prompts) == 1:
            prompts = prompts * num
        if len(prompts) != num:
            raise DataError(f"{len(prompts)} prompts for num={num} images: pass one prompt, or one per image.")
        if not all(isinstance(p, str) for p in prompts):
            raise DataError("prompts must be strings.")
        return prompts

    def pipeline_samples(self, pipe, prompts: list[str], seed, steps: int, guidance_scale: float, scheduler,
                         per_image: dict | None = None, sized: bool = True, **call_kwargs) -> np.ndarray:
        """Images for ``prompts`` from ``pipe`` (a StableDiffusionPipeline or a subclass), uint8
        [N, H, W, C], as run.sample draws them: initial latents normal(fold_in(key(seed), 0),
        [N, h, w, c]); chunk n of config.sampling.batch_size images is one call with seed
        fold_in(fold_in(key(seed), 1), n). per_image: {argument: array [N, ...]} passed chunk by
        chunk (e.g. a ControlNet's control images); call_kwargs are passed to every call, and
        height / width unless ``sized`` is False (pipelines whose input image fixes the size)."""
        num = len(prompts)
        key = jax.random.key(seed)
        latents = np.asarray(jax.random.normal(jax.random.fold_in(key, _KEY_LATENTS), (num, *self.latent_shape),
                                               jnp.float32))                 # [num, h, w, c]
        steps_root = jax.random.fold_in(key, _KEY_STEPS)
        height, width, _ = self.image_shape
        size = min(int(self.config.sampling.batch_size), num)
        out = []
        for n, (a, b) in enumerate(chunk_bounds(num, size)):
            rows = pad_rows(np.arange(a, b), size)                           # [size] prompt indices
            extra = {k: np.asarray(v)[rows] for k, v in (per_image or {}).items()}
            size_args = {"height": height, "width": width} if sized else {}
            images = pipe([prompts[i] for i in rows], num_inference_steps=steps, guidance_scale=guidance_scale,
                          seed=jax.random.fold_in(steps_root, n), latents=latents[rows], scheduler=scheduler,
                          **size_args, **extra, **call_kwargs)
            out.append(images[:b - a])                                       # [size, H, W, C] in [0, 1]
        return unit_to_uint8(np.concatenate(out), what="the text-to-image run")

    def default_prompts(self, num: int) -> list[str]:
        """The canonical captions of the dataset's combinations in order (shapes: 180), repeated."""
        if self.config.data.name != "shapes":
            raise DataError("prompts=None: the ldm task has default prompts only for shapes; pass prompts=.")
        return shapes_eval.default_prompts(num)

    # -- autoencoder and CLIP abilities ---------------------------------------------------------
    def encode(self, params, images) -> np.ndarray:
        """uint8 [N, H, W, C] -> scaled latents (posterior mean * scaling_factor) float32 [N, h, w, c]."""
        mean, _ = self.vae_stage.moments(params["vae"], images)
        return mean * np.float32(self._require_scaling())

    def decode(self, params, latents) -> np.ndarray:
        """Scaled latents float [N, h, w, c] -> uint8 [N, H, W, C]: the VAE decodes
        latents / scaling_factor."""
        return images_to_uint8(self.vae_stage.decode(params["vae"], latents, self._require_scaling()))

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
    def evaluate(self, run, out_dir):
        """The shapes evaluation (``jaxgen.eval.shapes``): the autoencoder on the eval split,
        prompt adherence with the sampling defaults (and at eval.guidance_scales), the targets of
        the default config; PNGs into out_dir (prompt_grid.png, all_prompts.png,
        reconstructions.png)."""
        e, s = self.config.eval, self.config.sampling
        out: dict[str, Any] = {
            "sampling_default": {"scheduler": s.scheduler, "num_steps": int(s.num_steps),
                                 "guidance_scale": float(s.guidance_scale)},
            "scaling_factor": self._require_scaling(),
        }
        test = self.vae_stage.load_data(self.config.data.eval_split)
        out.update(shapes_eval.reconstruction_report(run.reconstruct, test, out_dir))
        report = shapes_eval.text_to_image_report(run.sample, out_dir, int(e.samples_per_prompt),
                                                  plain(e.grid_prompts), plain(e.guidance_scales))
        by_guidance = report.pop("by_guidance", None)
        out.update(report)
        all_ = out["adherence_all_combinations"]
        out["target_color_0.9_met"] = bool(all_["color"] >= 0.9)
        out["target_shape_0.7_met"] = bool(all_["shape"] >= 0.7)
        if by_guidance is not None:
            out["by_guidance"] = by_guidance
        return out
