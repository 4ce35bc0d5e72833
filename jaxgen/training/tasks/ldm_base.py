"""Tasks that train one new part on top of a finished, frozen latent-diffusion run.

A ControlNet, an InstructPix2Pix or upscaling U-Net, a LoRA: each is trained against a text-to-image
stack (autoencoder, text encoder, U-Net) that stays as it is. ``FrozenLDMTask`` is what they
share:

* ``config.base_run``: the run directory of a finished ``ldm`` run (configs/shapes_ldm.py). It is
  loaded with ``load_run`` when the task attaches (its EMA parameters), never trained, and never
  copied into this run's checkpoints: they hold only what this run trains.
* DIR/base_run.json records the base's absolute path, its step and a SHA-256 fingerprint of its
  parameters. Resuming or loading the run checks the base against it: a base that was retrained
  or replaced is a CheckpointError (the new part was trained for other weights); a base that moved
  is found again by passing ``config.base_run`` (``--config.base_run=...``) when training, or by
  ``load_run(DIR, ...)`` reading the recorded path.
* The diffusion objective pieces the base run defines (schedule, prediction type, loss weights,
  latent scaling factor, the text context of captions, sampling defaults) come from the base's
  ``LDMTask``, so the new part is trained and sampled exactly as the base was.

A subclass sets ``name``, ``abilities``, builds ``self.model`` in ``build_model()`` (called at
attach, once the base is known) and implements ``inputs``, ``batch_arrays``, ``init_params``,
``loss_fn`` and its abilities; ``diffusion_inputs`` gives the noised latents, timesteps, targets
and contexts of a batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion import process
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.training.tasks.base import Task

BASE_RECORD = "base_run.json"


def params_fingerprint(params) -> str:
    """SHA-256 of a parameter tree: every leaf's path, dtype, shape and bytes, in path order."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class FrozenLDMTask(Task):
    """Base class of tasks trained on a frozen latent-diffusion run (module docstring).

    After ``attach``: ``base`` (the base jaxgen.Run), ``ldm`` (its LDMTask: vae with the scaling
    factor, text_encoder, tokenizer, schedule, make_scheduler, ...), ``base_params``
    ({"vae", "text", "unet"}), ``model`` (what this run trains, from ``build_model``).
    """

    name = "frozen-ldm"

    def __init__(self, config):
        self.config = config
        base = config.get("base_run", None)
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"a {self.name!r} config needs config.base_run: the run directory of a finished "
                              "latent-diffusion run (python -m train --config configs/shapes_ldm.py ...), e.g. "
                              "--config.base_run=runs/shapes_ldm.")
        self.base = None
        self.ldm = None
        self.base_params = None
        self.model = None
        self._workdir: str | None = None
        self._context_cache: dict = {}

    # -- the base ------------------------------------------------------------------------------
    def attach(self, workdir: str, training: bool) -> None:
        """Load the base run (config.base_run, else the path DIR/base_run.json recorded), check it
        against the record, write the record when training starts, then ``build_model()``."""
        from jaxgen.training.run import load_run

        self._workdir = os.path.abspath(workdir)
        record_path = os.path.join(self._workdir, BASE_RECORD)
        record = None
        if os.path.isfile(record_path):
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
        given = os.path.abspath(os.path.expanduser(self.config.base_run.strip()))
        path = given
        if not os.path.isdir(given) and record is not None and os.path.isdir(record["path"]):
            path = record["path"]                     # loading a run from another working directory
        if not os.path.isdir(path):
            raise ConfigError(f"config.base_run={self.config.base_run!r}: no such run directory ({given}); "
                              "train the base first (configs/shapes_ldm.py) or pass its directory with "
                              "--config.base_run=DIR.")
        base = load_run(path)
        if base.task.name != "ldm":
            raise ConfigError(f"config.base_run={path} is a {base.task.name!r} run; a {self.name!r} run is "
                              "trained on a finished latent-diffusion ('ldm') run.")
        fingerprint = params_fingerprint(base.params)
        if record is not None and record["fingerprint"] != fingerprint:
            raise CheckpointError(f"the base run {path} is not the one this run was trained on ({record['path']} "
                                  f"at step {record['step']}; its parameters differ now): point "
                                  "config.base_run at that run, or train this config in a new --workdir.")
        if record is None and training and jax.process_index() == 0:
            os.makedirs(self._workdir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".base_run-", dir=self._workdir)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"path": path, "step": int(base.step), "fingerprint": fingerprint}, f, indent=2)
            os.replace(tmp, record_path)             # atomic
        if record is None and not training:
            raise CheckpointError(f"{record_path} is missing: it names the base run this run was trained on. "
                                  "Copy the run directory whole.")
        self.base, self.ldm, self.base_params = base, base.task, base.params
        self.model = self.build_model()

    def build_model(self):
        """The module this run trains (called at attach, once ``self.ldm`` is known)."""
        raise TypeError(f"{type(self).__name__} is a FrozenLDMTask without build_model(): a family on a frozen "
                        "base defines the module it trains there (see ControlNetTask, UpscaleTask).")

    def _require_base(self):
        if self.ldm is None:
            raise ConfigError(f"the {self.name!r} task is not attached to a run directory yet "
                              "(task.attach(workdir, training) loads the base run).")
        return self.ldm

    # -- the diffusion objective of the base ---------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self._require_base().latent_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._require_base().image_shape

    def context_table(self, captions: list[str]) -> jnp.ndarray:
        """float32 [len(captions) + 1, 77, D]: the frozen text tower's context of each caption,
        the last row the empty prompt (classifier-free guidance's unconditional input)."""
        from jaxgen.pipelines.stable_diffusion import encode_prompts

        ldm = self._require_base()
        return jnp.asarray(encode_prompts(ldm.text_encoder, {"text_model": self.base_params["text"]["text_model"]},
                                          ldm.tokenizer, list(captions) + [""], batch_size=256))

    def latent_moments(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, C] -> the frozen autoencoder's posterior (mean, std), unscaled."""
        ldm = self._require_base()
        return ldm.vae_stage.moments(self.base_params["vae"], images)

    def diffusion_inputs(self, key, mean, std, rows, table, dropout: float, with_drop: bool = False):
        """The noised training inputs of a batch: (z_t, t, target, context, z_0), and with
        ``with_drop`` the bool [B] mask of the examples whose caption was dropped.

        mean, std: posterior moments [B, h, w, c] (unscaled); rows: int32 [B] rows of ``table``
        (float32 [U + 1, 77, D], last row the empty prompt), replaced by the last row with
        probability ``dropout``. z_0 is one posterior draw times the base's scaling factor, t
        uniform over the base's training timesteps, the target the base's prediction type.
        """
        ldm = self._require_base()
        k_z, k_t, k_eps, k_drop = jax.random.split(key, 4)
        z0 = (mean + std * jax.random.normal(k_z, mean.shape, jnp.float32)) * ldm.scaling_factor
        b = z0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, ldm.schedule.num_train_timesteps, jnp.int32)
        eps = jax.random.normal(k_eps, z0.shape, jnp.float32)
        zt = process.q_sample(ldm.schedule, z0, t, eps)
        drop = jax.random.bernoulli(k_drop, float(dropout), (b,))
        ctx = table[jnp.where(drop, table.shape[0] - 1, rows)]
        target = process.training_target(ldm.schedule, ldm.prediction_type, z0, eps, t)
        return (zt, t, target, ctx, z0, drop) if with_drop else (zt, t, target, ctx, z0)

    def weighted_mse(self, out, target, t) -> tuple[jax.Array, jax.Array]:
        """(the base's weighted loss, the plain MSE) of predictions ``out`` against ``target``."""
        per_example = jnp.mean((out.astype(jnp.float32) - target) ** 2, axis=tuple(range(1, out.ndim)))
        return jnp.mean(self._require_base().loss_weights(t) * per_example), jnp.mean(per_example)

    def sampling_settings(self, num_steps=None, guidance_scale=None, scheduler=None) -> tuple[int, float, Any]:
        """(steps, guidance scale, scheduler): the arguments, else this config's ``sampling`` fields
        when it has them, else the base run's."""
        ldm = self._require_base()
        own = self.config.get("sampling", None)
        base = ldm.config.sampling
        pick = (lambda f: own[f] if own is not None and f in own and own[f] is not None else base[f])
        steps = int(pick("num_steps") if num_steps is None else num_steps)
        g = float(pick("guidance_scale") if guidance_scale is None else guidance_scale)
        return steps, g, ldm.make_scheduler(scheduler)

    # -- files -----------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._require_base().tokenizer

    def tokenizer_for(self, workdir: str):
        return self._require_base().tokenizer
