"""``load_run(DIR)`` -> Run: a trained run's config, model and parameters, ready to use.

Restores into an abstract target whose shardings fit this process's devices (replicated over a
local mesh), so a run written on 8 devices loads on 1 and vice versa.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxgen.compile_cache import enable_compilation_cache
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.training import mesh as mesh_lib
from jaxgen.training.checkpoint import Checkpointer, abstract_with_shardings
from jaxgen.training.config_values import check_count
from jaxgen.training.optim import make_optimizer
from jaxgen.training.stages import (MAIN_STAGE, checkpoint_dir, ema_decay_of, final_params, handed_on,
                                     new_train_state, stage_config, uses_loss_scale)
from jaxgen.training.tasks import make_task


@dataclasses.dataclass
class Run:
    """A trained run. ``params`` are the EMA parameters when the run keeps them.

    ``model_state``: the model's non-parameter collections (e.g. {"vq_ema": ...} of an EMA
    codebook), None when it has none; ``variables``: what the task's abilities are called with,
    ``task.bind_state(params, model_state)`` (``params`` itself for tasks without model state).
    Multi-stage runs hold all three per stage: {stage: ...}.
    Images in and out are uint8 NHWC at the dataset's resolution.
    """

    config: ml_collections.ConfigDict
    task: Any
    params: Any
    step: int
    workdir: str
    raw_params: Any = None     # the non-EMA parameters (same as params when there is no EMA)
    model_state: Any = None
    variables: Any = None      # None: the same as params

    def __post_init__(self):
        if self.variables is None:
            if self.model_state is not None:
                raise ValueError("Run: a run with a model_state needs variables= (task.bind_state(params, "
                                 "model_state)); load_run builds both.")
            self.variables = self.params

    @property
    def model(self):
        return self.task.model

    @property
    def abilities(self) -> tuple[str, ...]:
        """The methods this run offers, as its task declares them (``Task.abilities``)."""
        return tuple(self.task.abilities)

    def _ability(self, name: str):
        """The task's method ``name`` with this run's variables bound, if the task declares it."""
        if name not in self.task.abilities:
            offered = ", ".join(self.task.abilities) or "no methods"
            raise AttributeError(f"a {self.task.name!r} run has no {name}(); it offers {offered} "
                                 "(see the Run section of the README).")
        return functools.partial(getattr(self.task, name), self.variables)

    def __getattr__(self, name: str):
        """Abilities beyond the ones spelled out below (e.g. ``run.translate``, ``run.colorize``,
        ``run.edit``) are found on the task: a new family adds them without editing the Run."""
        if name.startswith("_") or "task" not in self.__dict__:
            raise AttributeError(name)
        return self._ability(name)

    # autoencoder family
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> codes [N, ...]."""
        return self._ability("encode")(images)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes -> uint8 [N, H, W, C]."""
        return self._ability("decode")(codes)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> uint8 [N, H, W, C]."""
        return self._ability("reconstruct")(images)

    # generative runs
    def sample(self, num: int, seed: int = 0, labels=None, prompts=None, num_steps=None,
               guidance_scale=None, scheduler=None, **options) -> np.ndarray:
        """``num`` samples, uint8 [num, H, W, C]; None arguments take the config's sampling
        defaults; further keyword options are the task's (e.g. control= for a ControlNet run).
        A count or step number that is not a positive int is a DataError / ConfigError naming it."""
        check_count("num", num)
        if num_steps is not None:
            check_count("num_steps", num_steps, ConfigError)
        return self._ability("sample")(num, seed=seed, labels=labels, prompts=prompts, num_steps=num_steps,
                                       guidance_scale=guidance_scale, scheduler=scheduler, **options)

    # CLIP runs
    def encode_text(self, texts) -> np.ndarray:
        return self._ability("encode_text")(texts)

    def encode_image(self, images) -> np.ndarray:
        return self._ability("encode_image")(images)

    @property
    def tokenizer(self):
        if "tokenizer" not in self.task.abilities:
            raise AttributeError(f"a {self.task.name!r} run has no tokenizer.")
        return self.task.tokenizer_for(self.workdir)


def _find_config(workdir: str, step: int | None) -> dict:
    """The run's config, from its checkpoints (single-stage: DIR/checkpoints; else any stage's)."""
    base = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(base):
        raise CheckpointError(f"{workdir} has no checkpoint yet: train it first "
                              "(python -m train --config ... --workdir ...).")
    if any(d.isdigit() for d in os.listdir(base)):
        return Checkpointer(base, read_only=True).read_config(step)[0]
    for stage in sorted(os.listdir(base)):
        folder = os.path.join(base, stage)
        if os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder)):
            return Checkpointer(folder, read_only=True).read_config()[0]
    raise CheckpointError(f"{workdir} has no checkpoint yet: train it first "
                          "(python -m train --config ... --workdir ...).")


def load_run(workdir: str | os.PathLike, step: int | None = None) -> Run:
    """Load the run in ``workdir`` at ``step`` (default: its latest checkpoint).

    A damaged newest checkpoint is skipped with a warning naming the step and the file (the
    newest intact one loads; ``run.step`` says which); a damaged ``step`` asked for is a
    CheckpointError naming the other steps. Multi-stage runs load every stage (``step``
    applies to the last one); ``run.params``,
    ``run.model_state`` and ``run.variables`` are then {stage: ...}. Checkpoints written before
    TrainState had a model_state field load as they are (model_state None).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    if not os.path.isdir(workdir):
        raise CheckpointError(f"{workdir}: no such run directory.")
    enable_compilation_cache()
    config = ml_collections.ConfigDict(_find_config(workdir, step))
    task = make_task(config)
    task.attach(workdir, training=False)
    local = mesh_lib.make_mesh(-1, 1, devices=jax.local_devices())
    params, raw, model_state, variables, steps = {}, {}, {}, {}, {}
    for i, stage in enumerate(task.stages):
        sconf = stage_config(config, stage)
        sub = task.stage_task(stage, variables, sconf)
        folder = checkpoint_dir(workdir, stage)
        if not os.path.isdir(folder):
            raise CheckpointError(f"stage {stage!r} of {workdir} has no checkpoint yet: resume "
                                  "training (the same python -m train command) to finish it.")
        ckpt = Checkpointer(folder, read_only=True)
        tx, _ = make_optimizer(sconf.optim, sconf.total_steps)
        use_ema = ema_decay_of(sconf) is not None
        shapes = jax.eval_shape(lambda: new_train_state(sub, tx, use_ema, jax.random.key(0), uses_loss_scale(sconf)))
        abstract = abstract_with_shardings(shapes, jax.tree_util.tree_map(lambda _: mesh_lib.replicated(local), shapes))
        last = i == len(task.stages) - 1
        state, _, steps[stage] = ckpt.restore(abstract, step if last else None)
        params[stage], raw[stage], model_state[stage] = final_params(state), state.params, state.model_state
        variables[stage] = handed_on(sub, state)
    pick = (lambda d: d[MAIN_STAGE]) if tuple(task.stages) == (MAIN_STAGE,) else (lambda d: d)
    return Run(config=config, task=task, params=pick(params), step=int(steps[task.stages[-1]]),
               workdir=workdir, raw_params=pick(raw), model_state=pick(model_state),
               variables=pick(variables))
