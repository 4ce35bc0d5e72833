"""``load_run(DIR)`` -> Run: a trained run's config, model and parameters, ready to use.

Restores into an abstract target whose shardings fit this process's devices (replicated over a
local mesh), so a run written on 8 devices loads on 1 and vice versa.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxgen.errors import CheckpointError
from jaxgen.training import mesh as mesh_lib
from jaxgen.training.checkpoint import Checkpointer, abstract_with_shardings
from jaxgen.training.optim import make_optimizer
from jaxgen.training.trainer import ema_decay_of, new_train_state
from jaxgen.training.tasks import make_task


@dataclasses.dataclass
class Run:
    """A trained run. ``params`` are the EMA parameters when the run keeps them.

    Images in and out are uint8 NHWC at the dataset's resolution.
    """

    config: ml_collections.ConfigDict
    task: Any
    params: Any
    step: int
    workdir: str
    raw_params: Any = None     # the non-EMA parameters (same as params when there is no EMA)

    @property
    def model(self):
        return self.task.model

    def _ability(self, name: str):
        fn = getattr(self.task, name, None)
        if fn is None:
            raise AttributeError(f"a {self.task.name!r} run has no {name}(); see the Run section of "
                                 "the README for which runs offer which methods.")
        return fn

    # autoencoder family
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> codes [N, ...]."""
        return self._ability("encode")(self.params, images)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes -> uint8 [N, H, W, C]."""
        return self._ability("decode")(self.params, codes)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> uint8 [N, H, W, C]."""
        return self._ability("reconstruct")(self.params, images)

    # generative runs
    def sample(self, num: int, seed: int = 0, labels=None, prompts=None, num_steps=None,
               guidance_scale=None, scheduler=None) -> np.ndarray:
        """``num`` samples, uint8 [num, H, W, C]; None arguments take the config's sampling defaults."""
        return self._ability("sample")(self.params, num, seed=seed, labels=labels, prompts=prompts,
                                       num_steps=num_steps, guidance_scale=guidance_scale,
                                       scheduler=scheduler)

    # CLIP runs
    def encode_text(self, texts) -> np.ndarray:
        return self._ability("encode_text")(self.params, texts)

    def encode_image(self, images) -> np.ndarray:
        return self._ability("encode_image")(self.params, images)

    @property
    def tokenizer(self):
        return self._ability("tokenizer_for")(self.workdir)


def load_run(workdir: str | os.PathLike, step: int | None = None) -> Run:
    """Load the run in ``workdir`` at ``step`` (default: its latest checkpoint)."""
    workdir = os.path.abspath(os.fspath(workdir))
    if not os.path.isdir(workdir):
        raise CheckpointError(f"{workdir}: no such run directory.")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    if ckpt.latest_step() is None:
        raise CheckpointError(f"{workdir} has no checkpoint yet: train it first "
                              "(python -m train --config ... --workdir ...).")
    config = ml_collections.ConfigDict(ckpt.read_config(step))
    task = make_task(config)
    task.attach(workdir, training=False)
    tx, _ = make_optimizer(config.optim, config.total_steps)
    use_ema = ema_decay_of(config) is not None
    shapes = jax.eval_shape(lambda: new_train_state(task, tx, use_ema, jax.random.key(0)))
    local = mesh_lib.make_mesh(-1, 1, devices=jax.local_devices())
    abstract = abstract_with_shardings(shapes, jax.tree_util.tree_map(lambda _: mesh_lib.replicated(local), shapes))
    state, _, step = ckpt.restore(abstract, step)
    params = state.ema_params if state.ema_params is not None else state.params
    return Run(config=config, task=task, params=params, step=int(step), workdir=workdir, raw_params=state.params)
