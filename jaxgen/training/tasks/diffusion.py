"""Diffusion: a class-conditional DDPM trained on images, sampled with any jaxgen scheduler.

Training (``loss_fn``), per example of the global batch, from the step's key split by purpose:
  t ~ U{0, ..., T-1}, eps ~ N(0, I), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps   (q_sample)
  label -> the null label (id ``num_classes``) with probability ``label_dropout``
  loss  = mean_b w_b * mean_pixels (model(x_t, t, label) - target)^2
with target eps / v / x0 for prediction_type epsilon / v_prediction / sample, and w = 1
(``loss_weighting="uniform"``) or the min-SNR-gamma weight (``"min_snr"``, Hang et al. 2023).

Config fields (``config.diffusion``): num_train_timesteps, beta_schedule, beta_start, beta_end,
rescale_betas_zero_snr (diffusers' names and meaning), prediction_type, loss_weighting,
snr_gamma, num_classes (0: unconditional), label_dropout. The model is a UNet2DModel with
``num_class_embeds = num_classes + 1`` (the extra id is the null label of classifier-free
guidance).

Sampling (``config.sampling``): scheduler (a diffusers class name), num_steps, guidance_scale,
scheduler_config (extra diffusers fields, e.g. timestep_spacing, thresholding), step_options
(class name -> keyword arguments of its ``step``, e.g. DDIM's use_clipped_model_output). The scheduler is built from the
training schedule's fields plus scheduler_config, so it always matches what the model learned. The
whole loop is one ``lax.scan`` (jaxgen.diffusion.sampling), jitted once per (scheduler, steps,
guided or not, trajectory or not) and cached on the task; a new sample count recompiles for that
shape only. Guidance scale 1 runs only the conditional pass; any other scale runs the
unconditional and conditional passes as one batch of 2N, with the scale a traced argument (no
recompilation across scales).

Evaluation (``python -m train.eval``, ``config.eval``): an independent classifier
(jaxgen.eval.classifier.PixelClassifier, an SVC on the real training digits) reads back the class
of num_samples class-conditional samples (labels cycling 0..K-1): accuracy, and the Fréchet
distance between the samples and the test set in the classifier's feature space, next to the
real-vs-real distance (train vs test). Repeated for eval.schedulers ((class name, steps) pairs) and
eval.guidance_scales. Writes per-class grids and a denoising-trajectory strip under DIR/eval/.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data.fields import Input
from jaxgen.data.pipeline import images_to_float, images_to_uint8
from jaxgen.diffusion import process
from jaxgen.diffusion.sampling import guided_output, sample_loop
from jaxgen.diffusion.schedulers import SCHEDULERS, Scheduler, scheduler_from_config
from jaxgen.diffusion.schedules import make_schedule
from jaxgen.errors import ConfigError, DataError
from jaxgen.eval.images import class_rows_grid, make_grid, preview_upscale, save_png
from jaxgen.training.config_values import check_choice, check_guidance, check_range, plain
from jaxgen.training.tasks.base import Task, class_labels

LOSS_WEIGHTINGS = ("uniform", "min_snr")
# the fields of config.diffusion a scheduler must share with training
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                   "rescale_betas_zero_snr")
EVAL_SEED = 0


class TrainingScheduleMixin:
    """The schedule-dependent pieces shared by the diffusion tasks (DiffusionTask, the ldm task's
    LDMTask). The task sets ``config`` (with ``diffusion`` and ``sampling``), ``schedule``,
    ``prediction_type`` and ``_sched_cache = {}``."""

    def check_objective(self, d) -> None:
        """Check config.diffusion's prediction_type, loss_weighting and snr_gamma; sets
        self.prediction_type."""
        self.prediction_type = check_choice("diffusion.prediction_type", d.prediction_type,
                                            process.PREDICTION_TYPES)
        check_choice("diffusion.loss_weighting", d.loss_weighting, LOSS_WEIGHTINGS)
        if d.loss_weighting == "min_snr":
            check_range("diffusion.snr_gamma", d.snr_gamma, 0.0, low_open=True,
                        hint="min-SNR weighting needs gamma > 0; 5 is the paper's value")

    def loss_weights(self, t):
        """Per-example loss weights: t [B] int32 -> [B] float32 (ones, or min-SNR-gamma)."""
        d = self.config.diffusion
        if d.loss_weighting == "uniform":
            return jnp.ones(t.shape, jnp.float32)
        return process.min_snr_weights(self.schedule, t, float(d.snr_gamma), self.prediction_type)

    def scheduler_config(self, class_name: str) -> dict:
        """The diffusers scheduler_config dict of ``class_name`` for this run: the training
        schedule's fields, its prediction_type, and config.sampling.scheduler_config."""
        d = self.config.diffusion
        cfg = {"_class_name": class_name, "prediction_type": self.prediction_type,
               **{f: plain(d[f]) for f in SCHEDULE_FIELDS}}
        extra = plain(self.config.sampling.get("scheduler_config", None) or {})
        clash = sorted(set(extra) & set(cfg))
        if clash:
            raise ConfigError(f"sampling.scheduler_config sets {clash}: those come from the training "
                              "schedule (config.diffusion); remove them from scheduler_config.")
        return {**cfg, **extra}

    def make_scheduler(self, scheduler=None) -> Scheduler:
        """A jaxgen scheduler from a diffusers class name ("DDIMScheduler", ...) or a jaxgen
        scheduler object (checked against the training schedule)."""
        if scheduler is None:
            scheduler = self.config.sampling.scheduler
        if isinstance(scheduler, str):
            if scheduler not in SCHEDULERS:
                raise ConfigError(f"scheduler {scheduler!r} is unknown: use one of "
                                  f"{', '.join(sorted(SCHEDULERS))}.")
            if scheduler not in self._sched_cache:
                self._sched_cache[scheduler] = scheduler_from_config(self.scheduler_config(scheduler))
            return self._sched_cache[scheduler]
        if not isinstance(scheduler, Scheduler):
            raise ConfigError(f"scheduler={scheduler!r}: pass a diffusers class name such as "
                              "'DDIMScheduler' or a jaxgen scheduler object.")
        own = scheduler.config
        want = {"prediction_type": self.prediction_type,
                **{f: plain(self.config.diffusion[f]) for f in SCHEDULE_FIELDS}}
        bad = [f"{k}={own[k]!r} (trained with {v!r})" for k, v in want.items()
               if k in own and own[k] != v and not (isinstance(v, float) and np.isclose(own[k], v))]
        if bad:
            raise ConfigError(f"the {type(scheduler).__name__} passed does not match this run's "
                              f"training schedule: {', '.join(bad)}. Build it with "
                              "scheduler.replace(...) or pass its class name as a string.")
        return scheduler


class DiffusionTask(TrainingScheduleMixin, Task):
    """Trains ``UNet2DModel(x_t, t, class_labels)`` as a DDPM; ``sample`` runs any scheduler."""

    name = "diffusion"
    abilities = ("sample",)

    def __init__(self, config):
        super().__init__(config)
        d = config.diffusion
        self.check_objective(d)
        self.num_classes = int(d.num_classes)
        embeds = self.model.num_class_embeds
        if self.num_classes > 0 and embeds != self.num_classes + 1:
            raise ConfigError(f"model.num_class_embeds={embeds} but diffusion.num_classes="
                              f"{self.num_classes}: set num_class_embeds={self.num_classes + 1} (the "
                              "last id is the null label of classifier-free guidance).")
        if self.num_classes == 0 and (embeds is not None or self.model.class_embed_type is not None):
            raise ConfigError("diffusion.num_classes=0 (unconditional) but the model has a class "
                              "embedding: set model.num_class_embeds=None, or num_classes.")
        check_range("diffusion.label_dropout", d.label_dropout, 0.0, 1.0, high_open=True)
        self.schedule = make_schedule(d.beta_schedule, d.num_train_timesteps, d.beta_start, d.beta_end,
                                      rescale_betas_zero_snr=bool(d.rescale_betas_zero_snr))
        if self.prediction_type == "epsilon" and bool(d.rescale_betas_zero_snr):
            raise ConfigError("diffusion.rescale_betas_zero_snr=True with prediction_type='epsilon': "
                              "at alpha_bar = 0 the noise says nothing about x0. Use v_prediction.")
        self._samplers: dict = {}
        self._sched_cache: dict = {}

    # -- shapes ------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images the model generates."""
        size = self.model.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(h), int(w), int(self.model.in_channels)

    @property
    def null_label(self) -> int:
        """The class id of the unconditional (dropped) label: num_classes."""
        return self.num_classes

    def inputs(self):
        """{"image": uint8 [H, W, C] (the U-Net's sample size), "label": int32 [] (required when
        the model is class-conditional)}."""
        return {"image": Input("image", self.image_shape, doc="the training image"),
                "label": Input("int", (), optional=not self.num_classes,
                               doc="class id: this U-Net is class-conditional")}

    # -- model -------------------------------------------------------------------------------
    def init_params(self, key, batch):
        x = images_to_float(jnp.asarray(batch["image"][:1]))
        labels = jnp.zeros((1,), jnp.int32) if self.num_classes else None
        return self.model.init(key, x, jnp.zeros((1,), jnp.int32), class_labels=labels)["params"]

    def model_output(self, params, x, t, labels, dropout_key=None):
        """The U-Net's raw output. x: [B, H, W, C] float; t: [B] or [] timesteps (int or float);
        labels: int32 [B] (null label = num_classes) or None. Returns [B, H, W, C] float32."""
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        kwargs = {}
        if dropout_key is not None and self.model.dropout > 0:
            kwargs = {"rngs": {"dropout": dropout_key}, "deterministic": False}
        out = self.model.apply({"params": params}, x.astype(dtype), t, class_labels=labels, **kwargs)
        return out.astype(jnp.float32)

    def drop_labels(self, key, labels):
        """Classifier-free guidance training: each label becomes the null label (num_classes)
        with probability config.diffusion.label_dropout. labels: int32 [B] -> int32 [B]."""
        p = float(self.config.diffusion.label_dropout)
        if p == 0.0:
            return labels
        drop = jax.random.bernoulli(key, p, labels.shape)
        return jnp.where(drop, jnp.int32(self.null_label), labels.astype(jnp.int32))

    def loss_fn(self, params, batch, key):
        """batch: {"image": uint8 [B, H, W, C], "label": int32 [B]}; key: the step's key.
        Returns (weighted MSE on the prediction target, {"mse": unweighted MSE})."""
        x0 = images_to_float(batch["image"])  # uint8 -> [-1, 1]
        k_t, k_eps, k_label, k_drop = jax.random.split(key, 4)
        b = x0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps, jnp.int32)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        xt = process.q_sample(self.schedule, x0, t, eps)
        labels = self.drop_labels(k_label, batch["label"]) if self.num_classes else None
        out = self.model_output(params, xt, t, labels, dropout_key=k_drop)
        target = process.training_target(self.schedule, self.prediction_type, x0, eps, t)
        per_example = jnp.mean((out - target) ** 2, axis=tuple(range(1, x0.ndim)))  # [B]
        loss = jnp.mean(self.loss_weights(t) * per_example)
        return loss, {"mse": jnp.mean(per_example)}

    # -- sampling ----------------------------------------------------------------------------
    def _labels(self, num: int, labels) -> np.ndarray | None:
        """int32 [num] class labels (default: 0, 1, ..., K-1, 0, 1, ...), or None (unconditional)."""
        return class_labels(num, labels, self.num_classes, "this diffusion run is unconditional")

    def step_options(self, scheduler: Scheduler) -> dict:
        """Keyword arguments of ``scheduler.step`` from config.sampling.step_options[class name]
        (e.g. DDIM's use_clipped_model_output, eta)."""
        opts = plain(self.config.sampling.get("step_options", None) or {})
        return dict(opts.get(type(scheduler).__name__, {}))

    def sampler(self, scheduler: Scheduler, num_steps: int, guided: bool, trajectory: bool = False):
        """The jitted whole-loop sampler fn(params, x_init, labels, key, guidance) -> x0 [N, H, W, C]
        (and the trajectory [S, N, H, W, C] when ``trajectory``). Cached per arguments."""
        step_kwargs = self.step_options(scheduler)
        cache_key = (scheduler, int(num_steps), bool(guided), bool(trajectory),
                     tuple(sorted(step_kwargs.items())))
        if cache_key not in self._samplers:
            state = scheduler.set_timesteps(int(num_steps))

            def run(params, x_init, labels, key, guidance):
                def model_fn(x_in, t, c):
                    return self.model_output(params, x_in, jnp.broadcast_to(t, (x_in.shape[0],)), c)

                uncond = jnp.full_like(labels, self.null_label) if guided else None
                return sample_loop(scheduler, state, model_fn, x_init, key=key, cond=labels,
                                   uncond=uncond, guidance_scale=guidance if guided else 1.0,
                                   return_trajectory=trajectory, step_kwargs=step_kwargs)

            self._samplers[cache_key] = jax.jit(run)
        return self._samplers[cache_key]

    def sample_arrays(self, params, num, seed=0, labels=None, num_steps=None, guidance_scale=None,
                      scheduler=None, return_trajectory=False) -> dict:
        """``sample`` in float: {"images": float32 [num, H, W, C] (model space, about [-1, 1]),
        "trajectory": float32 [S, num, H, W, C] (the sample after each step, if asked),
        "x_init": float32 [num, H, W, C], "labels": int32 [num] or None, "scheduler", "state",
        "guidance_scale"}."""
        s = self.config.sampling
        num = int(num)
        if num < 1:
            raise DataError(f"num={num}: ask for at least one sample.")
        sched = self.make_scheduler(scheduler)
        steps = int(s.num_steps if num_steps is None else num_steps)
        g = check_guidance(s.guidance_scale if guidance_scale is None else guidance_scale,
                           "the samples are pushed away from their class labels (1 = no guidance, "
                           "above 1 = stronger adherence).")
        labels = self._labels(num, labels)
        guided = g != 1.0
        if guided and labels is None:
            raise ConfigError(f"guidance_scale={g} needs a class-conditional run; this one is "
                              "unconditional (use guidance_scale=1).")
        key = jax.random.key(seed)
        x_init = jax.random.normal(jax.random.fold_in(key, 0), (num, *self.image_shape), jnp.float32)
        fn = self.sampler(sched, steps, guided, return_trajectory)
        out = fn(params, x_init, None if labels is None else jnp.asarray(labels),
                 jax.random.fold_in(key, 1), jnp.float32(g))
        x, traj = out if return_trajectory else (out, None)
        return {"images": x, "trajectory": traj, "x_init": x_init, "labels": labels, "scheduler": sched,
                "state": sched.set_timesteps(steps), "guidance_scale": g}

    def sample(self, params, num, seed=0, labels=None, prompts=None, num_steps=None,
               guidance_scale=None, scheduler=None):
        """``num`` images, uint8 [num, H, W, C].

        labels: int [num] class ids, one int for all, or None (0..K-1 cycling); prompts: refused
        (class-conditional run). num_steps / guidance_scale / scheduler: None takes
        config.sampling's; scheduler is a diffusers class name or a jaxgen scheduler object.
        The initial noise comes from fold_in(key(seed), 0), per-step noise from fold_in(key(seed), 1).
        """
        if prompts is not None:
            raise DataError("this diffusion run is class-conditional: pass labels=, not prompts.")
        out = self.sample_arrays(params, num, seed=seed, labels=labels, num_steps=num_steps,
                                 guidance_scale=guidance_scale, scheduler=scheduler)
        return images_to_uint8(out["images"])

    def predict_x0(self, params, x_in, t, labels, guidance_scale: float = 1.0):
        """The model's (guided) estimate of x0 from the scaled sample x_in at timestep t.

        x_in: [B, H, W, C] float (the VP sample x_t, as scale_model_input gives it); t: [] int or
        float timestep (fractional t interpolates alpha_bar); labels: int32 [B] or None.
        Returns float32 [B, H, W, C].
        """
        fn = self.__dict__.get("_x0_fn")
        if fn is None:
            def x0_of(params, x_in, t, labels, g):
                def model_fn(x, tt, c):
                    return self.model_output(params, x, jnp.broadcast_to(tt, (x.shape[0],)), c)

                if labels is None:  # unconditional model: no guidance
                    out = guided_output(model_fn, x_in, t, None, None, 1.0)
                else:
                    out = guided_output(model_fn, x_in, t, labels, jnp.full_like(labels, self.null_label), g)
                T = self.schedule.num_train_timesteps
                a = jnp.interp(jnp.asarray(t, jnp.float32), jnp.arange(T, dtype=jnp.float32),
                               self.schedule.alpha_bar)
                if self.prediction_type == "epsilon":
                    return (x_in - jnp.sqrt(1 - a) * out) / jnp.sqrt(a)
                if self.prediction_type == "sample":
                    return out
                return jnp.sqrt(a) * x_in - jnp.sqrt(1 - a) * out  # v_prediction

            fn = self._x0_fn = jax.jit(x0_of)
        return fn(params, x_in, t, labels, jnp.float32(guidance_scale))

    # -- previews and evaluation ------------------------------------------------------------
    def _upscale(self) -> int:
        return preview_upscale(self.image_shape[0])

    def class_grid(self, samples: np.ndarray, labels: np.ndarray | None, per_class: int = 10) -> np.ndarray:
        """uint8 grid with one row per class (the first ``per_class`` samples of each)."""
        return class_rows_grid(samples, labels, self.num_classes, per_class, self._upscale())

    def preview(self, params, batch):
        n = 2 * max(self.num_classes, 1)
        samples = self.sample(params, n, seed=0)
        return make_grid(samples, ncol=max(self.num_classes, 8), upscale=self._upscale())

    def trajectory_strip(self, params, out_path: str, columns: int = 10) -> str:
        """A PNG of the default sampler's denoising trajectory, two rows per class: the sample
        x_t before ``columns`` evenly spaced steps, then the final image (top), and the model's
        estimate of x0 at those steps (bottom). Left: pure noise; early steps fix the digit's
        overall shape, later ones its detail."""
        n = max(self.num_classes, 1)
        out = self.sample_arrays(params, n, seed=1, return_trajectory=True)
        sched, state, traj = out["scheduler"], out["state"], out["trajectory"]
        before = jnp.concatenate([out["x_init"][None] * state.init_noise_sigma, traj[:-1]])  # x before step i
        picks = np.unique(np.linspace(0, traj.shape[0] - 1, columns).round().astype(int))
        xs, x0s = [], []
        for i in picks:
            x_in = sched.scale_model_input(state, before[i], int(i))
            xs.append(images_to_uint8(jnp.clip(x_in, -1, 1)))
            x0s.append(images_to_uint8(self.predict_x0(params, x_in, state.timesteps[i], None if out["labels"] is None
                                                       else jnp.asarray(out["labels"]), out["guidance_scale"])))
        final = images_to_uint8(out["images"])
        rows = []
        for k in range(n):  # per class: x_t row, then x0-estimate row
            rows.append(np.stack([x[k] for x in xs] + [final[k]]))
            rows.append(np.stack([x[k] for x in x0s] + [final[k]]))
        return save_png(out_path, make_grid(np.concatenate(rows), ncol=len(picks) + 1, upscale=self._upscale()))

    def evaluate(self, run, out_dir, num_samples: int | None = None):
        """Metrics of ``run`` (see the module docstring); PNGs into out_dir.

        num_samples: samples per setting (default config.eval.num_samples), labels cycling 0..K-1,
        seed 0 for every setting. Keys: classifier_test_accuracy and real_fd_train_vs_test (the
        classifier and the real-vs-real reference); sample_* for the default sampling;
        by_scheduler["<class>_<steps>"] and by_guidance["<scale>"] with accuracy, fd_vs_test,
        fd_ratio_to_real (fd_vs_test / real_fd_train_vs_test) and seconds (sampling wall time,
        compilation included); target_* booleans for accuracy >= 0.95 and FD <= 2x real.
        """
        from jaxgen.eval.classifier import PixelClassifier, frechet_distance

        e, s = self.config.eval, self.config.sampling
        n = int(num_samples or e.num_samples)
        train, test = self.load_data(self.config.data.train_split), self.load_data(self.config.data.eval_split)
        clf = PixelClassifier(train.images, train.labels)
        f_train, f_test = clf.features(train.images), clf.features(test.images)
        real_fd = frechet_distance(f_train, f_test)
        out: dict[str, Any] = {
            "num_samples": n,
            "classifier_test_accuracy": float(np.mean(clf.predict(test.images) == test.labels)),
            "real_fd_train_vs_test": real_fd,
            "sampling_default": {"scheduler": s.scheduler, "num_steps": int(s.num_steps),
                                 "guidance_scale": float(s.guidance_scale)},
        }
        labels = self._labels(n, None)
        done: dict[tuple, dict] = {}

        def measure(png, scheduler=None, num_steps=None, guidance_scale=None):
            setting = (scheduler or s.scheduler, int(num_steps or s.num_steps),
                       float(s.guidance_scale if guidance_scale is None else guidance_scale))
            if setting in done:  # the same sampling as an earlier setting: same samples, same figures
                return dict(done[setting])
            t0 = time.perf_counter()
            samples = run.sample(n, seed=EVAL_SEED, labels=labels, scheduler=setting[0],
                                 num_steps=setting[1], guidance_scale=setting[2])
            seconds = time.perf_counter() - t0
            feats = clf.features(samples)
            res = {"fd_vs_test": frechet_distance(feats, f_test)}
            if labels is not None:
                res["accuracy"] = float(np.mean(clf.predict(samples) == labels))
            res["fd_ratio_to_real"] = res["fd_vs_test"] / real_fd
            res["fd_vs_train"] = frechet_distance(feats, f_train)
            res["seconds"] = seconds
            save_png(os.path.join(out_dir, png), self.class_grid(samples, labels))
            done[setting] = res
            return dict(res)

        out.update({f"sample_{k}": v for k, v in measure("samples_per_class.png").items()})
        self.trajectory_strip(run.params, os.path.join(out_dir, "trajectory.png"))
        out["by_scheduler"] = {}
        for name, steps in plain(e.schedulers):
            out["by_scheduler"][f"{name}_{int(steps)}"] = measure(
                f"samples_{name}_{int(steps)}.png", scheduler=name, num_steps=int(steps))
        out["by_guidance"] = {}
        if labels is not None:
            for g in plain(e.guidance_scales):
                out["by_guidance"][f"{float(g):g}"] = measure(f"samples_guidance_{float(g):g}.png",
                                                              guidance_scale=float(g))
            out["target_accuracy_0.95_met"] = bool(out["sample_accuracy"] >= 0.95)
        out["target_fd_2x_real_met"] = bool(out["sample_fd_vs_test"] <= 2 * real_fd)
        return out
