"""LoRA trained on a finished, frozen latent-diffusion run (task "lora"; DreamBooth-style).

    python -m train --config configs/shapes_lora.py --workdir runs/shapes_lora --config.base_run=runs/shapes_ldm

Teaches the base model (``config.base_run``; jaxgen/training/tasks/ldm_base.py) a new word for a
shape it never saw (``lora.new_shape``: "cross", drawn by ``jaxgen.data.shapes.draw_extra_shape``
in every colour, size and place), with low-rank adapters on chosen U-Net modules
(``lora.target_modules``, peft's naming, ``lora.rank``, ``lora.alpha``) and nothing else trained:
the optimizer state and the checkpoints hold only the adapters (``jaxgen.lora``: ``init_lora``,
``merge``). Prior preservation, DreamBooth's idea: a fraction ``lora.preservation_fraction`` of
the examples are the base's own training data (shapes the model knows, with their captions), so
prompts without the new word keep the base's adherence. Their regression target is
``lora.preservation_target``: "data" (the diffusion target of the real image, as for the new
shape's examples) or "base" (the frozen base U-Net's own prediction at the same noisy latent,
timestep and prompt: the adapted model is distilled to the base there, and on every example whose
caption was dropped, so the unconditional branch that classifier-free guidance subtracts stays the
base's). The objective is the base's (schedule, prediction type, loss weights, scaling factor),
captions dropped to the empty prompt at ``lora.caption_dropout``.

Checkpoint params: {"unet": {kernel path with "." for "/": {"down": [.., r], "up": [r, out]}}};
``lora_tree(params)`` gives jaxgen.lora's {path: LoraWeights}.

The run: ``run.sample(num, prompts=..., seed=0, ..., lora_scale=1.0)`` (the base's sampler with the
adapters merged at lora_scale); ``run.lora_file(path)`` writes the adapters as a diffusers LoRA
file (``jaxgen.lora.save_lora``), which ``python -m train.export`` puts beside the exported base
folder (OUT/lora/pytorch_lora_weights.safetensors: diffusers' ``load_lora_weights`` reads it).
``python -m train.eval``: jaxgen/eval/lora.py.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data import shapes
from jaxgen.data.fields import Input
from jaxgen.errors import ConfigError, DataError
from jaxgen.lora import LoraWeights, init_lora, lora_nbytes, merge, save_lora
from jaxgen.training.config_values import check_range, plain
from jaxgen.training.tasks.ldm_base import FrozenLDMTask

NEW_SHAPE_SEED = 4321      # the jitter draws of the new shape's training examples
PRESERVATION_TARGETS = ("data", "base")


def _key(path: str) -> str:
    return path.replace("/", ".")


class LoraTask(FrozenLDMTask):
    """Task "lora" (module docstring). Batches: {"latent_mean", "latent_std": float32 [B, h, w, c];
    "caption": int32 [B] rows of the context table; "preserve": float32 [B], 1 on the dataset's
    (prior preservation) examples}."""

    name = "lora"
    abilities = ("sample", "encode_text", "tokenizer", "lora_file")

    def __init__(self, config):
        super().__init__(config)
        lo = config.get("lora", None)
        if lo is None:
            raise ConfigError("a lora config needs config.lora (see configs/shapes_lora.py).")
        check_range("lora.rank", lo.rank, 1, hint="the adapters' rank, e.g. 4")
        check_range("lora.alpha", lo.alpha, 0, low_open=True)
        check_range("lora.preservation_fraction", lo.preservation_fraction, 0.0, 1.0, high_open=True)
        check_range("lora.caption_dropout", lo.caption_dropout, 0.0, 1.0, high_open=True)
        if lo.get("preservation_target", "data") not in PRESERVATION_TARGETS:
            raise ConfigError(f"lora.preservation_target={lo.preservation_target!r}: choose one of "
                              f"{', '.join(PRESERVATION_TARGETS)} (the real image's target, or the frozen base's prediction).")
        if lo.new_shape not in shapes.EXTRA_SHAPES:
            raise ConfigError(f"lora.new_shape={lo.new_shape!r}: the generator draws {', '.join(shapes.EXTRA_SHAPES)}.")
        if not plain(lo.target_modules):
            raise ConfigError("lora.target_modules is empty: name the U-Net modules to adapt, e.g. "
                              "('to_q', 'to_k', 'to_v', 'to_out.0').")
        self.table = None

    def build_model(self):
        if self.config.model_class != "jaxgen.nn.unet:UNet2DConditionModel" or len(self.config.model):
            raise ConfigError("a lora run adapts the base's jaxgen.nn.unet:UNet2DConditionModel: set model_class to "
                              "it and leave config.model empty (rank and targets are config.lora's).")
        lo = self.config.lora
        # drawn once here, eagerly (init_lora draws on the host): init_params returns it as constants
        tree = init_lora(self.base_params["unet"], list(plain(lo.target_modules)), int(lo.rank),
                         jax.random.key(int(self.config.seed)), alpha=float(lo.alpha))
        self._init = {"unet": {_key(k): {"down": w.down, "up": w.up} for k, w in tree.items()}}
        return self.ldm.model

    # -- the adapters as params ------------------------------------------------------------------
    def lora_tree(self, params) -> dict[str, LoraWeights]:
        """{Flax kernel path: LoraWeights} of the U-Net adapters in ``params``."""
        alpha = float(self.config.lora.alpha)
        return {k.replace(".", "/"): LoraWeights(down=v["down"], up=v["up"], alpha=alpha)
                for k, v in params["unet"].items()}

    def unet_params(self, params, scale=1.0):
        """The base U-Net's parameters with the adapters merged at ``scale``."""
        return merge(self.base_params["unet"], self.lora_tree(params), scale)

    def init_params(self, key, batch) -> Any:
        """peft's start (``init_lora``: down uniform, up zero, so the merge is the base), drawn
        from config.seed when the task attached."""
        return self._init

    # -- data ----------------------------------------------------------------------------------
    def inputs(self) -> dict[str, Input]:
        return {"image": Input("image", self.image_shape, doc="a shape the base knows (prior preservation)"),
                "caption": Input("text", doc="its caption")}

    def new_shape_examples(self) -> dict:
        lo = self.config.lora
        return shapes.extra_shape_examples(str(lo.new_shape), int(lo.new_examples), NEW_SHAPE_SEED)

    def batch_arrays(self, ds):
        """The new shape's examples, plus preservation_fraction of the mix from the dataset."""
        lo = self.config.lora
        new = self.new_shape_examples()
        frac = float(lo.preservation_fraction)
        images, captions = new["image"], list(new["caption"])
        preserve = np.zeros(len(images), np.float32)
        if frac > 0:
            fields = self.gather(ds)
            k = int(round(len(images) * frac / (1.0 - frac)))
            if k > len(fields["image"]):
                raise DataError(f"lora.preservation_fraction={frac} asks for {k} examples of the dataset, which has "
                                f"{len(fields['image'])}: lower it or lora.new_examples.")
            pick = np.random.default_rng(NEW_SHAPE_SEED).choice(len(fields["image"]), k, replace=False)
            images = np.concatenate([images, fields["image"][np.sort(pick)]])
            captions += [fields["caption"][i] for i in np.sort(pick)]
            preserve = np.concatenate([preserve, np.ones(k, np.float32)])
        texts = sorted(set(captions))
        index = {t: i for i, t in enumerate(texts)}
        self.table = self.context_table(texts)
        mean, std = self.latent_moments(images)
        return {"latent_mean": mean, "latent_std": std, "caption": np.asarray([index[t] for t in captions], np.int32),
                "preserve": preserve}

    def example_batch(self) -> dict:
        z = np.zeros((1, *self.latent_shape), np.float32)
        return {"latent_mean": z, "latent_std": z, "caption": np.zeros((1,), np.int32),
                "preserve": np.zeros((1,), np.float32)}

    # -- objective -------------------------------------------------------------------------------
    def loss_fn(self, params, batch, key):
        if self.table is None:
            raise ConfigError("LoraTask.loss_fn needs batch_arrays(...) first (the text context table).")
        lo = self.config.lora
        zt, t, target, ctx, _, drop = self.diffusion_inputs(key, batch["latent_mean"], batch["latent_std"],
                                                            batch["caption"], self.table, float(lo.caption_dropout),
                                                            with_drop=True)
        out = self.model.apply({"params": self.unet_params(params)}, zt, t, ctx)
        if lo.get("preservation_target", "data") == "base":
            base_out = self.model.apply({"params": self.base_params["unet"]}, zt, t, ctx)
            keep = (batch["preserve"] > 0) | drop
            target = jnp.where(keep.reshape(-1, *([1] * (target.ndim - 1))),
                               jax.lax.stop_gradient(base_out).astype(target.dtype), target)
        loss, mse = self.weighted_mse(out, target, t)
        return loss, {"mse": mse}

    # -- the run ---------------------------------------------------------------------------------
    def pipeline_components(self, params) -> dict[str, Any]:
        """The base's StableDiffusionPipeline (what the export writes) and, under "lora", the
        adapters as a jaxgen.lora adapter ({"unet": tree}) for the LoRA file beside it."""
        c = self.ldm.pipeline_components(self.base_params)
        c["lora"] = {"unet": self.lora_tree(params)}
        return c

    def sample(self, params, num, seed=0, labels=None, prompts=None, num_steps=None, guidance_scale=None,
               scheduler=None, lora_scale: float = 1.0):
        """The base run's sample with the adapters merged at ``lora_scale`` (0: the base itself)."""
        if labels is not None:
            raise DataError("this run is text-conditioned: pass prompts=, not labels.")
        prompts = self.ldm.sample_prompts(num, prompts)
        steps, g, sched = self.sampling_settings(num_steps, guidance_scale, scheduler)
        merged = dict(self.base_params, unet=self.unet_params(params, float(lora_scale)))
        return self.ldm.pipeline_samples(self.ldm.pipeline(merged), prompts, seed, steps, g, sched)

    def lora_file(self, params, path: str) -> str:
        """Write the adapters as a diffusers LoRA safetensors file (a folder, or a *.safetensors path)."""
        return save_lora(path, {"unet": self.lora_tree(params)})

    def adapter_bytes(self, params) -> dict[str, int]:
        """{"lora": bytes of the adapters, "unet": bytes of the full U-Net}."""
        return {"lora": lora_nbytes(params), "unet": lora_nbytes(self.base_params["unet"])}

    def encode_text(self, params, texts) -> np.ndarray:
        return self.ldm.encode_text(self.base_params, texts)

    def evaluate(self, run, out_dir: str) -> dict:
        from jaxgen.eval import lora as lora_eval

        return lora_eval.evaluate(run, out_dir, self.config.get("eval", None))
