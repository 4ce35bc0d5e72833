"""VQ-VAE with a prior over its codes: two stages in one run directory.

Stage "vqvae" (``VQVAEStage``) trains ``jaxgen.nn.prior:ConvVQVAE`` on images in [-1, 1] with
straight-through gradients through the quantizer (jaxgen.nn.vq.quantize). ``model.codebook_type``
picks the codebook:
  "ema" (configs/digits_vqvae.py's default): the codebook is an exponential moving average
      (``model.ema_decay``) of the encoder outputs assigned to each code, kept in the train
      state's model state (collection "vq_ema"), updated by the forward pass of every train step
      (``loss_fn_with_state``);
          loss = mse(reconstruction, x) + beta * commitment loss
      and a code that no latent picked for ``model.dead_code_threshold`` consecutive steps
      restarts at a random encoder output of the batch (jaxgen.nn.vq.restart_dead_codes, key from
      the step's key; 0 = no restarts).
  "gradient": a codebook parameter (``loss_fn``);
          loss = mse + codebook loss + beta * commitment loss + vq.dead_code_weight * dead_code_loss
      Dead-code revival for it (jaxgen.nn.prior.dead_code_loss): code k, whenever no latent of the
      batch picks it, is pulled towards the current encoding of a fixed training position k (K
      positions of ceil(K / (h*w)) training images drawn with config.seed). Restarts would have to
      overwrite a parameter, which the optimizer owns; the pull is their stateless counterpart
      (measured in docs/VQVAE.md: 43 -> 64 codes used). It is refused with the EMA codebook.

Stage "prior" (``PriorStage``) encodes the training images once with the frozen VQ-VAE (its final
parameters, EMA when kept, and its EMA codebook) into code sequences [N, h*w] (raster order) and
trains ``jaxgen.nn.prior:CodePrior`` (class token first, then the codes) by next-token
cross-entropy.

The run (``VQVAETask``; run.params = {"vqvae": ..., "prior": ...}, run.model_state = {"vqvae":
{"vq_ema": ...} or None, "prior": None}, run.variables = {"vqvae": {"params": ..., "vq_ema": ...},
"prior": ...}, which the task's methods take):
    run.encode(images uint8 [N, H, W, C]) -> code indices int32 [N, h, w]
    run.decode(indices int [N, h, w]) -> uint8 [N, H, W, C]
    run.reconstruct(images) -> uint8 images (decode(encode(images)))
    run.sample(num, seed=0, labels=None) -> uint8 [num, H, W, C]: ancestral sampling of the codes
        with config.sampling.temperature (one jitted lax.fori_loop over positions), decoded by the
        VQ-VAE decoder; labels default to 0, 1, ..., 9, 0, 1, ...
``python -m train.eval``: reconstruction error, codebook usage and perplexity (train and test
codes), the prior's bits per code on train and test codes, and the accuracy of class-conditional
samples under an independent classifier (jaxgen.eval.classifier.PixelClassifier, an SVC on the
real training digits), per sampling temperature; PNGs of per-class samples and reconstructions.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import losses
from jaxgen.data.chunks import map_chunked
from jaxgen.data.fields import Input
from jaxgen.data.pipeline import images_to_float, images_to_uint8
from jaxgen.errors import ConfigError, DataError
from jaxgen.eval.images import class_rows_grid, make_grid, preview_upscale, save_png
from jaxgen.nn.prior import code_nll, dead_code_loss, sample_codes
from jaxgen.training.config_values import check_range
from jaxgen.training.tasks.base import Task, build_module, class_labels

EVAL_SEED = 0
REFERENCE_STREAM = 17  # the RNG stream [seed, 17] that picks the dead codes' reference images
CHUNK = 512  # images per jitted call in encode/decode/reconstruct


def _vq_fn(model, name: str):
    """A jitted ``fn(variables, x)`` for one ConvVQVAE method (compiled once per batch shape);
    variables: {"params": ..., and "vq_ema": ... for an EMA codebook}."""
    methods = {
        "encode": lambda m, x: m.quantize(m.encode(x)).indices,          # [B, H, W, C] -> int32 [B, h, w]
        "decode": lambda m, idx: m.decode_indices(idx),                  # int [B, h, w] -> [B, H, W, C]
        "reconstruct": lambda m, x: m(x).reconstruction,                 # [B, H, W, C] -> [B, H, W, C]
    }
    method = methods[name]
    return jax.jit(lambda v, x: model.apply(v, x, method=method))


def _chunked(fn, params, x: np.ndarray) -> np.ndarray:
    """fn(params, chunk) over x [N, ...] in chunks of at most CHUNK rows, each zero-padded to a
    power of two, so a few batch shapes compile, not one per N."""
    return map_chunked(lambda part: fn(params, part), [x], CHUNK, power_of_two=True, pad="zeros")


class VQVAEStage(Task):
    """Stage 1: the ConvVQVAE autoencoder (see the module docstring for the loss).

    Its inference functions (preview, ``fn``) take Flax variables {"params": ..., "vq_ema": ...}
    (``bind_state``; only "params" for the gradient codebook).
    """

    name = "vqvae"

    def __init__(self, config):
        super().__init__(config)
        for field in ("num_codes", "code_dim", "grid_size", "codebook_type"):
            if not hasattr(self.model, field):
                raise ConfigError(f"model_class={config.model_class!r} is not a VQ-VAE with {field}; the "
                                  "vqvae task trains jaxgen.nn.prior:ConvVQVAE.")
        self.ema = self.model.codebook_type == "ema"
        self.dead_code_weight = check_range("vq.dead_code_weight", config.vq.dead_code_weight, 0.0,
                                            hint="0 turns the pull on unused codes off")
        if self.ema and self.dead_code_weight:
            raise ConfigError(f"vq.dead_code_weight={self.dead_code_weight} pulls unused codes of a gradient-"
                              "trained codebook; the EMA codebook (model.codebook_type='ema') revives codes "
                              "by restarts (model.dead_code_threshold): set vq.dead_code_weight=0.")
        self._fns: dict = {}
        self._reference: np.ndarray | None = None

    @property
    def reference_images(self) -> np.ndarray:
        """uint8 [R, H, W, C]: the fixed training images whose encodings are the dead codes'
        targets, R = ceil(num_codes / grid_size**2), drawn without replacement with config.seed."""
        if self._reference is None:
            images = self.load_data(self.config.data.train_split).images
            per_image = int(self.model.grid_size) ** 2
            count = -(-int(self.model.num_codes) // per_image)
            if count > len(images):
                raise ConfigError(f"num_codes={self.model.num_codes} needs {count} reference images for "
                                  f"dead-code revival; the training split has {len(images)}. Set "
                                  "vq.dead_code_weight=0 or use fewer codes.")
            pick = np.random.default_rng([int(self.config.seed), REFERENCE_STREAM]).choice(len(images), count, replace=False)
            self._reference = images[np.sort(pick)]
        return self._reference

    # -- model state: the EMA codebook ----------------------------------------------------
    def init_variables(self, key, batch):
        """(params, model_state): model_state is {"vq_ema": ...} for the EMA codebook, else None."""
        variables = dict(self.model.init(key, images_to_float(batch["image"][:1])))
        params = variables.pop("params")
        return params, (variables or None)

    def bind_state(self, params, model_state):
        """The Flax variables the inference functions take: {"params": params, **model_state}."""
        return {"params": params, **(model_state or {})}

    def loss_fn(self, params, batch, key):
        """Gradient codebook: (loss, metrics); see the module docstring."""
        if self.ema:
            raise TypeError("the EMA codebook updates model state: the trainer calls loss_fn_with_state.")
        x = images_to_float(batch["image"])  # uint8 [B, H, W, C] -> [-1, 1]
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        out = self.model.apply({"params": params}, x.astype(dtype))
        loss, metrics = self._loss(out, x)
        if self.dead_code_weight > 0:
            k = int(self.model.num_codes)
            codebook = self.model.apply({"params": params}, method=lambda m: m.codebook())
            ref = images_to_float(jnp.asarray(self.reference_images)).astype(dtype)
            targets = self.model.apply({"params": params}, ref, method=lambda m, r: m.encode(r))
            targets = targets.reshape(-1, targets.shape[-1])[:k]  # [R, h, w, D] -> [K, D]
            dead = dead_code_loss(codebook, out.quantized.indices, targets)
            loss = loss + self.dead_code_weight * dead
        else:
            dead = jnp.zeros((), jnp.float32)
        return loss, {**metrics, "dead_code_loss": dead}

    def loss_fn_with_state(self, params, model_state, batch, key):
        """EMA codebook: (loss, (metrics, new model_state)). The forward pass quantizes with the
        codebook in ``model_state``, then updates it from this batch's encoder outputs (and restarts
        dead codes at random ones, drawn with ``key``); the loss has no codebook term."""
        x = images_to_float(batch["image"])  # uint8 [B, H, W, C] -> [-1, 1]
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        out, new_state = self.model.apply({"params": params, **model_state}, x.astype(dtype), train=True,
                                          key=key, mutable=list(model_state))
        loss, metrics = self._loss(out, x)
        k = int(self.model.num_codes)
        used = jnp.bincount(out.quantized.indices.reshape(-1), length=k) > 0  # [K]
        unused = new_state["vq_ema"]["quantizer"]["unused"]  # [K], 0 after a use or a restart
        metrics["codes_restarted"] = jnp.sum((unused == 0) & ~used).astype(jnp.float32)
        return loss, (metrics, new_state)

    def _loss(self, out, x):
        """MSE + the quantizer's loss, and the metrics both objectives log."""
        q = out.quantized
        mse = losses.mse(out.reconstruction, x)
        return mse + q.loss, {"mse": mse, "codebook_loss": q.codebook_loss, "commitment_loss": q.commitment_loss,
                              "codebook_usage": q.usage, "perplexity": q.perplexity}

    def fn(self, name: str):
        if name not in self._fns:
            self._fns[name] = _vq_fn(self.model, name)
        return self._fns[name]

    def preview(self, variables, batch):
        """16 batch images over their reconstructions; variables: bind_state(params, model_state)."""
        images = np.asarray(jax.device_get(batch["image"]))[:16]
        recon = images_to_uint8(self.fn("reconstruct")(variables, images_to_float(images)))
        return make_grid(np.concatenate([images, recon]), ncol=len(images), upscale=preview_upscale(images.shape[1]))


class PriorStage(Task):
    """Stage 2: CodePrior on the code sequences of the frozen VQ-VAE (next-token cross-entropy).

    vqvae: the VQVAEStage whose model encodes; vqvae_variables: its final Flax variables
    (VQVAEStage.bind_state: the parameters, and the EMA codebook's state if any).
    Batches: {"codes": int32 [B, L], "label": int32 [B]}.
    """

    name = "vqvae:prior"

    def __init__(self, config, vqvae: VQVAEStage, vqvae_variables):
        super().__init__(config)
        self.vqvae, self.vqvae_variables = vqvae, vqvae_variables
        self.seq_len = int(self.model.seq_len)
        self.num_classes = int(self.model.num_classes)

    def inputs(self):
        """The VQ-VAE's image, and the class label when the prior is class-conditional."""
        return {"image": self.vqvae.inputs()["image"],
                "label": Input("int", (), optional=not self.num_classes,
                               doc="class id: the prior is class-conditional (or set "
                                   "stages.prior.model.num_classes=0)")}

    def batch_arrays(self, ds):
        """Encode the split once: {"codes": int32 [N, L] (raster order), "label": int32 [N]}."""
        fields = self.gather(ds)
        codes = _chunked(self.vqvae.fn("encode"), self.vqvae_variables, images_to_float(fields["image"]))
        arrays = {"codes": codes.reshape(len(codes), -1).astype(np.int32)}  # [N, h, w] -> [N, L]
        arrays["label"] = fields.get("label", np.zeros(len(codes), np.int32)).astype(np.int32)
        return arrays

    def example_batch(self):
        return {"codes": np.zeros((1, self.seq_len), np.int32), "label": np.zeros((1,), np.int32)}

    def _labels(self, batch):
        return batch["label"] if self.num_classes else None

    def init_params(self, key, batch):
        return self.model.init(key, self._labels(batch), jnp.asarray(batch["codes"]))["params"]

    def preview(self, params, batch):
        """Two samples per class (config.sampling.temperature), decoded: a uint8 grid, one column per class."""
        n = 2 * max(self.num_classes, 1)
        labels = jnp.arange(n, dtype=jnp.int32) % self.num_classes if self.num_classes else None
        fn = self.__dict__.setdefault("_preview_fn", jax.jit(
            lambda p, y: sample_codes(self.model, p, jax.random.key(0), y, n, self.config.sampling.temperature)))
        grid = int(self.vqvae.model.grid_size)
        codes = np.asarray(fn(params, labels)).reshape(n, grid, grid)  # raster order -> [n, h, w]
        images = images_to_uint8(self.vqvae.fn("decode")(self.vqvae_variables, codes))
        return make_grid(images, ncol=max(self.num_classes, 8), upscale=preview_upscale(images.shape[1]))

    def loss_fn(self, params, batch, key):
        codes = batch["codes"]
        logits = self.model.apply({"params": params}, self._labels(batch), codes, deterministic=False,
                                  rngs={"dropout": key})
        nll = code_nll(logits, codes)
        acc = jnp.mean((jnp.argmax(logits, -1) == codes).astype(jnp.float32))
        return nll, {"nll": nll, "bits_per_code": nll / jnp.log(2.0), "next_code_accuracy": acc}


class VQVAETask(Task):
    """The whole run: stages ("vqvae", "prior"), and the Run's abilities on run.variables,
    {"vqvae": the VQ-VAE's Flax variables (VQVAEStage.bind_state), "prior": the prior's params}."""

    name = "vqvae"
    abilities = ("encode", "decode", "reconstruct", "sample", "sample_codes")
    stages = ("vqvae", "prior")

    def __init__(self, config):
        super().__init__(config)  # self.model: the VQ-VAE
        if "stages" not in config or any(s not in config.stages for s in self.stages):
            raise ConfigError("the vqvae task trains two stages: the config needs stages.vqvae and "
                              "stages.prior (see configs/digits_vqvae.py).")
        p = config.stages.prior
        if "model_class" not in p or "model" not in p:
            raise ConfigError("stages.prior needs model_class and model (the CodePrior to train).")
        self.prior = build_module(p.model_class, p.model.to_dict())
        grid = int(self.model.grid_size)
        if int(self.prior.num_codes) != int(self.model.num_codes):
            raise ConfigError(f"stages.prior.model.num_codes={self.prior.num_codes} differs from the "
                              f"VQ-VAE's model.num_codes={self.model.num_codes}: set them equal.")
        if int(self.prior.seq_len) != grid * grid:
            raise ConfigError(f"stages.prior.model.seq_len={self.prior.seq_len} but the VQ-VAE makes a "
                              f"{grid}x{grid} grid: set seq_len={grid * grid}.")
        self.num_classes = int(self.prior.num_classes)
        self.grid = grid
        self._vq: VQVAEStage | None = None
        self._samplers: dict = {}

    def stage_task(self, stage, frozen, config):
        if stage == "vqvae":
            return VQVAEStage(config)
        if stage == "prior":
            if "vqvae" not in frozen:
                raise ConfigError("the prior stage needs the trained VQ-VAE: train stage 'vqvae' first.")
            return PriorStage(config, self._vqvae(), frozen["vqvae"])
        raise ConfigError(f"the vqvae task has stages {self.stages}, not {stage!r}.")

    def _vqvae(self) -> VQVAEStage:
        if self._vq is None:
            from jaxgen.training.stages import stage_config

            self._vq = VQVAEStage(stage_config(self.config, "vqvae"))
        return self._vq

    @staticmethod
    def _split(variables):
        """(the VQ-VAE's Flax variables, the prior's params) of run.variables."""
        if (not isinstance(variables, dict) or set(variables) != {"vqvae", "prior"}
                or not isinstance(variables["vqvae"], dict) or "params" not in variables["vqvae"]):
            raise DataError("a vqvae run's methods take run.variables, the dict {'vqvae': {'params': ..., "
                            "('vq_ema': ...)}, 'prior': ...} that load_run returns (run.params lacks the "
                            "EMA codebook's state).")
        return variables["vqvae"], variables["prior"]

    # -- Run abilities (uint8 NHWC at the dataset's resolution in and out) ------------------
    def encode(self, variables, images):
        """uint8 [N, H, W, C] -> code indices int32 [N, h, w] in [0, num_codes)."""
        vq, _ = self._split(variables)
        return _chunked(self._vqvae().fn("encode"), vq, images_to_float(self.check_images(images)))

    def decode(self, variables, codes):
        """Code indices int [N, h, w] in [0, num_codes) -> uint8 [N, H, W, C]."""
        vq, _ = self._split(variables)
        codes = np.asarray(codes)
        k = int(self.model.num_codes)
        if codes.ndim != 3 or codes.shape[1:] != (self.grid, self.grid) or not np.issubdtype(codes.dtype, np.integer):
            raise DataError(f"codes have shape {codes.shape} and dtype {codes.dtype}; decode takes int "
                            f"[N, {self.grid}, {self.grid}] code indices (what run.encode returns).")
        if codes.size and (codes.min() < 0 or codes.max() >= k):
            raise DataError(f"code indices must lie in [0, {k - 1}]; got [{codes.min()}, {codes.max()}].")
        return images_to_uint8(_chunked(self._vqvae().fn("decode"), vq, codes.astype(np.int32)))

    def reconstruct(self, variables, images):
        """uint8 [N, H, W, C] -> uint8 [N, H, W, C] through the quantized codes."""
        vq, _ = self._split(variables)
        return images_to_uint8(_chunked(self._vqvae().fn("reconstruct"), vq,
                                        images_to_float(self.check_images(images))))

    def _labels(self, num: int, labels) -> np.ndarray | None:
        """int32 [num] class labels (default 0, 1, ..., K-1, 0, ...), or None (unconditional prior)."""
        return class_labels(num, labels, self.num_classes, "this prior is unconditional (num_classes=0)")

    def sample_codes(self, variables, num: int, seed: int = 0, labels=None, temperature: float | None = None):
        """Code grids drawn from the prior: int32 [num, h, w]. temperature None: config.sampling's."""
        _, prior_params = self._split(variables)
        num = int(num)
        if num < 1:
            raise DataError(f"num={num}: ask for at least one sample.")
        t = float(self.config.sampling.temperature if temperature is None else temperature)
        if not np.isfinite(t) or t < 0:
            raise DataError(f"temperature={t} must be finite and >= 0 (0 = argmax decoding).")
        labels = self._labels(num, labels)
        if num not in self._samplers:  # compiled once per sample count; temperature is traced
            self._samplers[num] = jax.jit(lambda p, k, y, tt: sample_codes(self.prior, p, k, y, num, tt))
        codes = self._samplers[num](prior_params, jax.random.key(seed),
                                    None if labels is None else jnp.asarray(labels), jnp.float32(t))
        return np.asarray(codes).reshape(num, self.grid, self.grid)  # raster order -> [num, h, w]

    def sample(self, variables, num, seed=0, labels=None, prompts=None, num_steps=None,
               guidance_scale=None, scheduler=None, temperature=None):
        """``num`` images, uint8 [num, H, W, C]: codes from the prior (ancestral sampling at
        ``temperature``, None = config.sampling.temperature), decoded by the VQ-VAE.

        labels: int [num], one int for all, or None (0..K-1 cycling). The prior samples one code per
        position, so num_steps, guidance_scale, scheduler and prompts are refused.
        """
        for name, value in (("prompts", prompts), ("num_steps", num_steps),
                            ("guidance_scale", guidance_scale), ("scheduler", scheduler)):
            if value is not None:
                raise DataError(f"a vqvae run samples one code per position with its prior: it takes "
                                f"labels= (and temperature=, default config.sampling.temperature), not "
                                f"{name}=.")
        return self.decode(variables, self.sample_codes(variables, num, seed, labels, temperature))

    # -- evaluation -------------------------------------------------------------------------
    def class_grid(self, samples: np.ndarray, labels: np.ndarray | None, per_class: int = 10) -> np.ndarray:
        """uint8 grid with one row per class (the first ``per_class`` samples of each)."""
        return class_rows_grid(samples, labels, self.num_classes, per_class, preview_upscale(samples.shape[1]))

    def prior_bits_per_code(self, variables, codes: np.ndarray, labels: np.ndarray) -> float:
        """The prior's mean cross-entropy in bits per code on code grids int [N, h, w]."""
        _, prior_params = self._split(variables)
        fn = self.__dict__.setdefault("_nll_fn", jax.jit(
            lambda p, y, c: code_nll(self.prior.apply({"params": p}, y, c), c)))
        seqs = codes.reshape(len(codes), -1).astype(np.int32)  # [N, L]
        y = labels.astype(np.int32) if self.num_classes else None
        total = sum(float(fn(prior_params, None if y is None else y[i:i + CHUNK], seqs[i:i + CHUNK]))
                    * len(seqs[i:i + CHUNK]) for i in range(0, len(seqs), CHUNK))
        return total / len(seqs) / float(np.log(2.0))

    def evaluate(self, run, out_dir, num_samples: int | None = None) -> dict:
        """Metrics of the run (module docstring); PNGs samples_per_class.png, reconstructions.png."""
        from jaxgen.eval.classifier import PixelClassifier, confidence_and_entropy, frechet_distance
        from jaxgen.nn.vq import codebook_usage

        e = self.config.eval
        n = int(num_samples or e.num_samples)
        train, test = self.load_data(self.config.data.train_split), self.load_data(self.config.data.eval_split)
        k = int(self.model.num_codes)
        clf = PixelClassifier(train.images, train.labels)
        f_test = clf.features(test.images)
        recon = run.reconstruct(test.images)
        out: dict[str, Any] = {
            "num_samples": n,
            "test_mse": float(np.mean((recon / 255.0 - test.images / 255.0) ** 2)),
            "classifier_test_accuracy": float(np.mean(clf.predict(test.images) == test.labels)),
            "reconstruction_classifier_accuracy": float(np.mean(clf.predict(recon) == test.labels)),
            "real_fd_train_vs_test": frechet_distance(clf.features(train.images), f_test),
        }
        c_train, c_test = run.encode(train.images), run.encode(test.images)
        for split, codes in (("train", c_train), ("test", c_test)):
            used, ppl = codebook_usage(jnp.asarray(codes), k)
            out[f"codebook_usage_{split}"] = float(used)
            out[f"codebook_perplexity_{split}"] = float(ppl)
        out["num_codes"] = k
        out["prior_bits_per_code_train"] = self.prior_bits_per_code(run.variables, c_train, train.labels)
        out["prior_bits_per_code_test"] = self.prior_bits_per_code(run.variables, c_test, test.labels)
        up = preview_upscale(test.images.shape[1])
        save_png(os.path.join(out_dir, "reconstructions.png"),
                 make_grid(np.concatenate([test.images[:16], recon[:16]]), ncol=16, upscale=up))

        labels = self._labels(n, None)
        train_seqs = {row.tobytes() for row in c_train.reshape(len(c_train), -1).astype(np.int32)}
        default_t = float(self.config.sampling.temperature)
        temps = sorted({default_t, *(float(t) for t in e.temperatures)})
        out["sampling_default"] = {"temperature": default_t}
        out["by_temperature"] = {}
        for t in temps:
            t0 = time.perf_counter()
            codes = self.sample_codes(run.variables, n, EVAL_SEED, labels, t)
            samples = run.decode(codes)
            seconds = time.perf_counter() - t0
            conf, ent = confidence_and_entropy(clf.probs(samples))
            res = {"accuracy": None if labels is None else float(np.mean(clf.predict(samples) == labels)),
                   "confidence": conf, "class_entropy": ent,
                   "fd_vs_test": frechet_distance(clf.features(samples), f_test),
                   "fraction_codes_seen_in_train": float(np.mean(
                       [row.tobytes() in train_seqs for row in codes.reshape(n, -1).astype(np.int32)])),
                   "seconds_incl_compile": seconds}
            out["by_temperature"][f"{t:g}"] = res
            if t == default_t:
                out.update({f"sample_{key}": v for key, v in res.items()})
                save_png(os.path.join(out_dir, "samples_per_class.png"), self.class_grid(samples, labels))
        out["target_codebook_usage_0.5_met"] = bool(out["codebook_usage_train"] >= 0.5)
        if labels is not None:
            out["target_sample_accuracy_0.8_met"] = bool(out["sample_accuracy"] >= 0.8)
        return out
