"""The training loop: one code path for one CPU, a device mesh, or many processes.

``train(config, workdir)`` builds the task, mesh and optimizer, resumes from the latest checkpoint
in ``workdir`` if there is one, and runs jit-compiled steps with NamedShardings (batch over
(data, fsdp), parameters by the fsdp rule) until ``config.total_steps``.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen.compile_cache import enable_compilation_cache
from jaxgen.data import pipeline
from jaxgen.errors import CheckpointError, ConfigError, NonFiniteError
from jaxgen.training import init_from as init_from_lib
from jaxgen.training import mesh as mesh_lib
from jaxgen.training.checkpoint import Checkpointer, abstract_with_shardings, check_writable, max_to_keep
from jaxgen.training.config_values import check_range
from jaxgen.training.optim import make_optimizer
from jaxgen.training.run import load_run
from jaxgen.training.stages import (MAIN_STAGE, checkpoint_dir, ema_decay_of, handed_on, new_train_state,
                                    stage_config, uses_loss_scale)
from jaxgen.training.state import TrainState
from jaxgen.training.step import make_train_step
from jaxgen.training.tasks import make_task

log = logging.getLogger("jaxgen")

REQUIRED_FIELDS = ("seed", "batch_size", "total_steps", "checkpoint_every", "log_every", "mesh",
                   "task", "model_class", "model", "data", "optim")
# Fields a resumed run may change (schedules and bookkeeping); any other change is refused.
RESUMABLE_CHANGES = ("total_steps", "checkpoint_every", "log_every", "image_every", "keep_checkpoints",
                     "mesh", "nan_policy")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate_config(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Fail early, naming the field, on a config the trainer cannot run. ``init_from`` sources are
    checked on disk, except for stages that already have a checkpoint in ``workdir``."""
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise ConfigError(f"config lacks {', '.join(missing)}; every config defines {', '.join(REQUIRED_FIELDS)}.")
    for f in ("batch_size", "total_steps", "checkpoint_every", "log_every"):
        if int(config[f]) <= 0:
            raise ConfigError(f"config.{f}={config[f]} must be a positive integer.")
    if config.get("compute_dtype", "float32") not in DTYPES:
        raise ConfigError(f"config.compute_dtype={config.compute_dtype!r}: choose one of {', '.join(DTYPES)}.")
    if config.get("nan_policy", "stop") not in ("stop", "skip"):
        raise ConfigError(f"config.nan_policy={config.nan_policy!r}: choose 'stop' or 'skip'.")
    max_to_keep(config.get("keep_checkpoints", 3))
    check_optim(config.optim)
    init_from_lib.validate(config, workdir)


def check_optim(optim) -> None:
    """ConfigError naming the field for optimizer settings that cannot train: a learning rate
    that is not positive (a negative one trains by gradient ascent), Adam betas outside [0, 1),
    negative eps, weight decay, clipping or warm-up."""
    check_range("config.optim.lr", optim.lr, 0, low_open=True,
                hint="a negative learning rate climbs the loss; e.g. 1e-3")
    for f in ("b1", "b2"):
        if f in optim:
            check_range(f"config.optim.{f}", optim[f], 0, 1, high_open=True)
    for f in ("eps", "weight_decay", "clip_norm", "warmup_steps"):
        if f in optim and optim[f] is not None:
            hint = "0 switches it off" if f in ("clip_norm", "warmup_steps") else ""
            check_range(f"config.optim.{f}", optim[f], 0, hint=hint)
    if "final_lr_ratio" in optim:
        check_range("config.optim.final_lr_ratio", optim.final_lr_ratio, 0, 1)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def _drop_unset(d):
    """A config dict without None values and empty groups: a field added later with an unset
    default (e.g. data.options.resolution) compares equal to its absence in an older run."""
    if not isinstance(d, dict):
        return d
    out = {k: _drop_unset(v) for k, v in d.items() if v is not None}
    return {k: v for k, v in out.items() if v != {}}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def _resumable(change: str) -> bool:
    """A diff line "a.b.c: old -> new" names a field a resumed run may change (also per stage)."""
    path = change.split(":")[0].split(".")
    if path[0] == "stages" and len(path) > 2:
        path = path[2:]  # stages.<stage>.<field>
    return path[0] in RESUMABLE_CHANGES


def _check_resume_config(saved: dict, new: dict, workdir: str) -> None:
    # init_from switched off equals an absent one (runs saved before the field existed)
    changes = [c for c in _diff(_drop_unset(init_from_lib.strip_defaults(saved)),
                                _drop_unset(init_from_lib.strip_defaults(new))) if not _resumable(c)]
    if changes:
        raise ConfigError(f"{workdir} holds a run with a different config ({'; '.join(changes)}). "
                          "Resume with the same config, or start the new one in a new --workdir.")


class Trainer:
    """Trains one stage of a run; ``fit()`` trains to total_steps, resuming by itself.

    task: the stage's task (default: built from config, attached to workdir). resume_step: the
    checkpoint to resume from (default: the newest intact one); steps after it are moved aside
    to DIR/checkpoints/STEP.superseded, not deleted. progress_label: the progress bar's label
    (default "train", or "stage NAME" for a stage of a multi-stage run).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, stage: str = MAIN_STAGE,
                 task=None, run_config: ml_collections.ConfigDict | None = None,
                 resume_step: int | None = None, progress_label: str | None = None):
        validate_config(config, workdir)
        enable_compilation_cache()
        self.config, self.workdir, self.stage = config, os.path.abspath(workdir), stage
        self.resume_step = resume_step
        # the progress bar's label (train() passes "stage i/n NAME" for multi-stage runs)
        self.progress_label = progress_label or ("train" if stage == MAIN_STAGE else f"stage {stage}")
        # the whole run's config: saved with every checkpoint, compared on resume
        self.run_config = config if run_config is None else run_config
        check_writable(self.workdir)
        self.is_main = jax.process_index() == 0
        if task is None:
            task = make_task(config)
            task.attach(self.workdir, training=True)
        self.task = task
        self.mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
        batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if config.batch_size % batch_devices:
            raise ConfigError(f"batch_size={config.batch_size} must be divisible by the mesh's "
                              f"data x fsdp = {batch_devices} devices.")
        self.tx, self.schedule = make_optimizer(config.optim, config.total_steps)
        self.ema_decay = ema_decay_of(config)
        root = jax.random.key(config.seed)
        self.init_key, self.train_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
        self.data = self.task.batch_arrays(self.task.load_data(config.data.train_split))
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        self.checkpointer = Checkpointer(checkpoint_dir(self.workdir, stage),
                                         max_to_keep=max_to_keep(config.get("keep_checkpoints", 3)))

    # -- state ------------------------------------------------------------------------------
    def _create(self) -> TrainState:
        return new_train_state(self.task, self.tx, self.ema_decay is not None, self.init_key,
                               uses_loss_scale(self.config))

    def abstract_state(self):
        shapes = jax.eval_shape(self._create)
        self.state_shardings = mesh_lib.state_shardings(shapes, self.mesh)
        return abstract_with_shardings(shapes, self.state_shardings)

    def initial_state(self) -> tuple[TrainState, int]:
        abstract = self.abstract_state()
        latest = self.checkpointer.latest_step()
        config_dict = config_to_dict(self.run_config)
        if latest is None and self.resume_step is not None:
            raise CheckpointError(f"--step {self.resume_step}: {self.checkpointer.folder} has no checkpoint "
                                  "yet; omit --step to start training.")
        if latest is None:
            # built in place with its shardings: never the whole state on one device first
            state = jax.jit(self._create, out_shardings=self.state_shardings)()
            init_cfg = self.config.get("init_from", None)
            if init_cfg is not None and init_cfg.source:   # only here: a resume has the weights
                state, _ = init_from_lib.init_state(state, init_cfg, self.state_shardings, self.workdir,
                                                    self.stage, write=self.is_main, log_to=log.info)
            return state, 0
        # the saved config is compared before the state is read: a changed model is reported as
        # the changed config field; a damaged newest step is skipped (and moved aside) with a warning
        state, _, step = self.checkpointer.restore(
            abstract, step=self.resume_step,
            check_config=lambda saved: _check_resume_config(saved, config_dict, self.workdir))
        if self.resume_step is not None:
            later = [s for s in self.checkpointer.all_steps() if s > step]
            if later:
                self.checkpointer.set_aside(later, "superseded")
        log.info("resumed %s at step %d", self.workdir, step)
        return state, step

    # -- loop -------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> TrainState:
        """Train from the latest checkpoint to total_steps (or ``stop_after`` steps, for tests).
        The first metrics.jsonl row it writes also holds the train step's ``compile_seconds`` and
        ``trace_seconds`` (see ``_compile``); steps_per_sec excludes the compilation."""
        cfg = self.config
        state, start = self.initial_state()
        if self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(self.run_config.to_json(indent=2))
        stateful = state.model_state is not None
        compute_dtype = DTYPES[cfg.get("compute_dtype", "float32")]
        task_loss = self.task.loss_fn_with_state if stateful else self.task.loss_fn

        def loss_fn(*args):                  # traced with the model computing in compute_dtype
            with self.task.computing_in(compute_dtype):
                return task_loss(*args)

        step_fn = make_train_step(loss_fn, self.tx, schedule=self.schedule, ema_decay=self.ema_decay,
                                  ema_warmup=bool(cfg.get("ema", {}).get("warmup", True)),
                                  compute_dtype=compute_dtype, stateful=stateful)
        replicated = mesh_lib.replicated(self.mesh)
        jitted = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding, replicated),
                         out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
        compiled, compile_times = None, {}
        logger = MetricLogger(self.workdir, enabled=self.is_main, stage=self.stage)
        end = cfg.total_steps if stop_after is None else min(cfg.total_steps, start + stop_after)
        pending: list[dict] = []
        bar = _progress(start, cfg.total_steps, self.is_main, self.progress_label)
        t_last, s_last = time.perf_counter(), start
        image_every = int(cfg.get("image_every", 0) or 0)
        config_dict = config_to_dict(self.run_config)
        try:
            for step in range(start, end):
                local = pipeline.host_batch(self.data, cfg.batch_size, cfg.seed, step)
                batch = pipeline.global_batch(local, self.batch_sharding)
                if compiled is None:        # compiled explicitly, once, to time it (the same program)
                    compiled, compile_times = self._compile(jitted, state, batch, self.train_key)
                    t_last = time.perf_counter()
                state, metrics = compiled(state, batch, self.train_key)
                pending.append(metrics)
                done = step + 1
                last = done == end
                if done % cfg.log_every == 0 or last:
                    means = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
                    pending = []
                    self._check_finite(state, done)
                    now = time.perf_counter()
                    means["steps_per_sec"] = (done - s_last) / max(now - t_last, 1e-9)
                    means.update(compile_times)     # on the first row this process logs, then empty
                    compile_times = {}
                    t_last, s_last = now, done
                    logger.write(done, means)
                    bar.set_postfix(loss=f"{means['loss']:.4g}", it_s=f"{means['steps_per_sec']:.1f}")
                if done % cfg.checkpoint_every == 0 or done == cfg.total_steps:
                    self._check_finite(state, done)
                    self.checkpointer.save(done, state, config_dict)
                if self.is_main and image_every and (done % image_every == 0 or done == cfg.total_steps):
                    self.write_preview(state, batch, done)
                bar.update(1)
        finally:
            bar.close()
            self.checkpointer.wait()
            logger.close()
        return state

    def _compile(self, jitted, state: TrainState, batch: dict, key):
        """The train step lowered and compiled for these arguments, and its compile time:
        {"compile_seconds": trace + lowering + XLA compilation (or loading from the persistent
        cache, jaxgen/compile_cache.py), "trace_seconds": the trace and lowering part}."""
        t0 = time.perf_counter()
        lowered = jitted.lower(state, batch, key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        log.info("train step%s compiled in %.1f s (trace and lowering %.1f s, XLA %.1f s)",
                 "" if self.stage == MAIN_STAGE else f" of stage {self.stage}", t2 - t0, t1 - t0, t2 - t1)
        return compiled, {"compile_seconds": t2 - t0, "trace_seconds": t1 - t0}

    def _check_finite(self, state: TrainState, step: int) -> None:
        bad = int(state.nonfinite)
        if bad == 0:
            return
        if self.config.get("nan_policy", "stop") == "stop":
            raise NonFiniteError(
                f"training produced a NaN/Inf loss or gradient ({bad} step(s) refused by step {step}); "
                "the run stops and no checkpoint after the last finite one is written. Lower optim.lr, "
                "check the data, or set --config.nan_policy=skip to skip such steps.")
        log.warning("%d step(s) with a NaN/Inf loss or gradient skipped so far", bad)

    def write_preview(self, state: TrainState, batch: dict, step: int) -> None:
        from jaxgen.eval.images import save_png

        grid = self.task.preview(handed_on(self.task, state), batch)
        if grid is not None:
            prefix = "" if self.stage == MAIN_STAGE else f"{self.stage}_"
            save_png(os.path.join(self.workdir, "images", f"{prefix}step_{step:07d}.png"), grid)


class MetricLogger:
    """metrics.jsonl (one JSON object per log step) and TensorBoard scalars, on process 0."""

    def __init__(self, workdir: str, enabled: bool = True, stage: str = MAIN_STAGE):
        self.enabled, self.stage = enabled, stage
        if not enabled:
            return
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        tb_dir = os.path.join(workdir, "tensorboard") if stage == MAIN_STAGE else os.path.join(workdir, "tensorboard", stage)
        self.tb = SummaryWriter(tb_dir)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics} if self.stage == MAIN_STAGE else {"stage": self.stage, "step": step, **metrics}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _progress(start: int, total: int, enabled: bool, label: str = "train"):
    """The step progress bar (steps, rate, ETA) on stderr, labelled with the stage."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True, desc=label)


def train(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None,
          step: int | None = None):
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the Run.

    step: resume from this checkpoint step instead of the newest intact one (``python -m train
    --step N``); in a multi-stage run it applies to the last stage that has checkpoints. Later
    steps of that stage are moved aside (STEP.superseded), never deleted. A damaged newest step
    is skipped with a warning naming it and the file (see jaxgen/training/checkpoint.py).

    A task with several stages (``task.stages``, e.g. an autoencoder, then a prior on its codes)
    trains them in order, each to its own total_steps with its own checkpoints; later stages get
    the earlier stages' final parameters (``handed_on``: with their model state, if any). A stage
    already at its total_steps is only restored.
    """
    validate_config(config, workdir)
    enable_compilation_cache()              # before the task compiles anything (jaxgen/compile_cache.py)
    check_writable(os.path.abspath(workdir))
    task = make_task(config)
    task.attach(os.path.abspath(workdir), training=True)
    resume_stage = None
    if step is not None:
        started = [s for s in task.stages if _has_steps(checkpoint_dir(os.path.abspath(workdir), s))]
        if not started:
            raise CheckpointError(f"--step {step}: {os.path.abspath(workdir)} has no checkpoint yet; omit "
                                  "--step to start training.")
        resume_stage = started[-1]
    frozen: dict = {}
    for i, stage in enumerate(task.stages):
        sconf = stage_config(config, stage)
        sub = task.stage_task(stage, frozen, sconf)
        trainer = Trainer(sconf, workdir, stage, sub, run_config=config,
                          resume_step=step if stage == resume_stage else None,
                          progress_label=f"stage {i + 1}/{len(task.stages)} {stage}" if len(task.stages) > 1 else None)
        state = trainer.fit(stop_after=stop_after)
        trainer.checkpointer.close()
        frozen[stage] = handed_on(sub, state)
    return load_run(workdir)


def _has_steps(folder: str) -> bool:
    return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))
