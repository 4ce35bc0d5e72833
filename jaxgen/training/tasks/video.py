"""Text-to-video trained on a frozen latent-diffusion run (task "video").

    python -m train --config configs/shapes_video.py --workdir runs/shapes_video --config.base_run=runs/shapes_ldm

What is trained: a ``UNet3DConditionModel`` (diffusers' text-to-video layout, jaxgen/nn/unet3d.py)
from scratch. Its fields are ``config.model``; in/out channels, ``cross_attention_dim`` and
``sample_size`` come from the base run (``config.base_run``, see ldm_base.py): its autoencoder's
latent channels and latent size, its text tower's width.

Latent space: the base's autoencoder applied to every frame, frozen. All training frames are
encoded once (posterior moments [N, F, h, w, c], the ``latent_mean`` / ``latent_std`` batch
fields); each step draws one posterior sample per frame, scaled by the base's scaling factor.
Objective: the base's (schedule, prediction type, loss weights), one timestep per clip and
independent noise per frame (``FrozenLDMTask.diffusion_inputs`` on [B, F, h, w, c]); the clip's
caption is dropped to the empty prompt with probability video.caption_dropout (classifier-free
guidance). video.temporal_dropout applies the temporal convolutions' dropout (0.1, diffusers'
train mode).

The text tower, video.train_text_encoder: False keeps the base's text tower frozen (the captions'
contexts are computed once; the run's params are the U-Net's tree). True (the default config)
trains a copy of it with the U-Net: the run's params are then {"unet": ..., "text_encoder":
{"text_model": ...}}, initialised from the base's text tower, and each step encodes the data's
captions (and the empty prompt) with the current weights. The base's text tower was trained on the
image captions only: words the clips add ("moving up", "moving down", "standing still") are split
into single characters its CLIP stage never trained, and the frozen tower maps "moving up" and
"moving down" to nearly the same context (docs/VIDEO.md); the U-Net cannot tell them apart.

Joint training on images (Video Diffusion Models, Ho et al.), video.joint_images = K > 0: every
step also trains on K still images of the base's own training data (its data config, its
captions: "a large red circle on the left") as one-frame clips, so temporal attention and
convolution see one frame (the paper's masked temporal attention) while the spatial layers learn
from the images; the loss is the mean over the B clips and K images. Example j of the clip data
carries image j mod (number of images).

Export: ``python -m train.export`` writes a diffusers TextToVideoSDPipeline folder (the U-Net, the
base's autoencoder, the text tower: the trained one or the base's, the tokenizer, the scheduler).

The run: ``run.sample(num, prompts=None, seed=0, num_steps=None, guidance_scale=None,
scheduler=None, num_frames=None)`` -> uint8 [num, F, H, W, 3] through
``jaxgen.TextToVideoSDPipeline`` assembled in memory from this U-Net, the text tower (the run's
copy, or the base's when frozen) and the base's autoencoder, tokenizer and scheduler; prompts default to the 90 colour x shape x direction
prompts (jaxgen/eval/video.py). Initial latents normal(fold_in(key(seed), 0), [num, F, h, w, c]);
chunk n of sampling.batch_size clips is one pipeline call with seed fold_in(fold_in(key(seed), 1),
n). ``run.encode_text``: the base's CLIP text embeddings through the run's text tower;
``run.tokenizer``: the base's. ``python -m train.eval``:
jaxgen/eval/video.py (docs/VIDEO.md).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data.chunks import chunk_bounds, pad_rows
from jaxgen.data.fields import Input
from jaxgen.data.pipeline import unit_to_uint8
from jaxgen.errors import ConfigError, DataError
from jaxgen.training.config_values import check_range, plain
from jaxgen.training.tasks.base import build_module
from jaxgen.training.tasks.ldm_base import FrozenLDMTask

MODEL_CLASS = "jaxgen.nn.unet3d:UNet3DConditionModel"
UNET, TEXT = "unet", "text_encoder"     # the params' subtrees when video.train_text_encoder
_KEY_LATENTS, _KEY_STEPS = 0, 1      # run.sample: fold_in(key(seed), purpose), as the ldm run


class VideoTask(FrozenLDMTask):
    """Task "video" (module docstring). Batches: {"latent_mean", "latent_std": float32
    [B, F, h, w, c]; "caption": int32 [B] rows of the context table}; with video.joint_images also
    {"image_mean", "image_std": float32 [B, h, w, c]; "image_caption": int32 [B]}."""

    name = "video"
    abilities = ("sample", "encode_text", "tokenizer")

    def __init__(self, config):
        super().__init__(config)
        v = config.get("video", None)
        if v is None:
            raise ConfigError("a video config needs config.video (see configs/shapes_video.py).")
        n = v.num_frames
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"video.num_frames={n!r}: the clips' frame count, an int >= 1.")
        check_range("video.caption_dropout", v.caption_dropout, 0.0, 1.0, high_open=True)
        k = v.joint_images
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= int(config.batch_size):
            raise ConfigError(f"video.joint_images={k!r}: the still images per step, an int in 0..batch_size "
                              f"({config.batch_size}); 0 trains on clips only.")
        t = v.get("train_text_encoder", False)
        if not isinstance(t, bool):
            raise ConfigError(f"video.train_text_encoder={t!r}: True (train the base's text tower with the U-Net) "
                              "or False (keep it frozen).")
        self.table = None
        self.table_ids = None
        self._pipe = None

    @property
    def trains_text(self) -> bool:
        """Whether the run trains its own copy of the base's text tower (video.train_text_encoder)."""
        return bool(self.config.video.get("train_text_encoder", False))

    def unet_params(self, params):
        """The U-Net's subtree of the run's params."""
        return params[UNET] if self.trains_text else params

    def text_params(self, params) -> dict:
        """The text tower's params {"text_model": ...}: the run's own when it trains them, else the base's."""
        if self.trains_text:
            return params[TEXT]
        return {"text_model": self.base_params["text"]["text_model"]}

    @property
    def num_frames(self) -> int:
        return int(self.config.video.num_frames)

    @property
    def joint_images(self) -> int:
        return int(self.config.video.joint_images)

    def build_model(self):
        """The UNet3DConditionModel of config.model, with in/out channels, cross_attention_dim and
        sample_size the base's (set in config.model only to the same values)."""
        if self.config.model_class != MODEL_CLASS:
            raise ConfigError(f"model_class={self.config.model_class!r}: a video run trains {MODEL_CLASS}.")
        fields = plain(self.config.model)
        h, w, c = self.latent_shape
        derived = {"in_channels": c, "out_channels": c, "cross_attention_dim": int(self.ldm.context_dim),
                   "sample_size": h if h == w else (h, w)}
        for key, value in derived.items():
            if fields.get(key) is not None and plain(fields[key]) != value:
                raise ConfigError(f"model.{key}={fields[key]!r}, but the base run gives {value!r} (its autoencoder's "
                                  "latents and text tower's width): leave it out of config.model.")
            fields[key] = value
        return build_module(MODEL_CLASS, fields)

    # -- data ----------------------------------------------------------------------------------
    def inputs(self) -> dict[str, Input]:
        return {"frames": Input("image", (self.num_frames, *self.image_shape), doc="the clip's frames"),
                "caption": Input("text", doc="its caption, e.g. 'a red circle moving right'")}

    def batch_arrays(self, ds):
        """The clips' frames encoded once by the frozen autoencoder (posterior moments per frame),
        the captions as rows of the context table (self.table_ids; self.table, the frozen tower's
        contexts, when it is not trained); with joint_images the base's
        training images too."""
        fields = self.gather(ds)
        frames, captions = fields["frames"], list(fields["caption"])
        n, f = frames.shape[:2]
        out = {}
        texts = set(captions)
        if self.joint_images:
            images, image_captions = self.still_images()
            texts |= set(image_captions)
        texts = sorted(texts)
        index = {t: i for i, t in enumerate(texts)}
        # the captions (and "") as token ids, encoded in each step when the text tower trains; else
        # the base's (frozen) contexts, computed once here; last row ""
        self.table_ids = jnp.asarray(self.ldm.tokenizer.encode(texts + [""]), jnp.int32)   # [U + 1, 77]
        self.table = None if self.trains_text else self.context_table(texts)
        mean, std = self.latent_moments(frames.reshape((n * f,) + frames.shape[2:]))   # [(N F), h, w, c]
        out["latent_mean"] = mean.reshape((n, f) + mean.shape[1:])
        out["latent_std"] = std.reshape((n, f) + std.shape[1:])
        out["caption"] = np.asarray([index[t] for t in captions], np.int32)
        if self.joint_images:
            pick = np.arange(n) % len(images)                 # example j carries image j mod #images
            mean, std = self.latent_moments(images[:n])       # the images picked: the first min(n, #images)
            out["image_mean"], out["image_std"] = mean[pick], std[pick]
            out["image_caption"] = np.asarray([index[image_captions[i]] for i in pick], np.int32)
        return out

    def still_images(self) -> tuple[np.ndarray, list[str]]:
        """The base run's training images and captions (its data config): uint8 [M, H, W, C], M str."""
        from jaxgen.data import load_dataset
        from jaxgen.data.fields import gather

        d = self.ldm.config.data
        ds = load_dataset(d.name, d.train_split, data_dir=self.config.data.get("data_dir") or None)
        fields = gather(ds, {"image": Input("image", self.image_shape), "caption": Input("text")},
                        where=f"video.joint_images: the base's data {d.name}/{d.train_split}")
        return fields["image"], list(fields["caption"])

    def example_batch(self) -> dict:
        h, w, c = self.latent_shape
        z = np.zeros((1, self.num_frames, h, w, c), np.float32)
        out = {"latent_mean": z, "latent_std": z, "caption": np.zeros((1,), np.int32)}
        if self.joint_images:
            out.update(image_mean=z[:, 0], image_std=z[:, 0], image_caption=np.zeros((1,), np.int32))
        return out

    # -- model ---------------------------------------------------------------------------------
    def init_params(self, key, batch) -> Any:
        h, w, c = self.latent_shape
        ctx = jnp.zeros((1, 77, self.ldm.context_dim), jnp.float32)
        unet = self.model.init(key, jnp.zeros((1, self.num_frames, h, w, c), jnp.float32),
                               jnp.zeros((1,), jnp.int32), ctx)["params"]
        if not self.trains_text:
            return unet
        # a copy of the base's text tower (copied: the trainer may donate the params' buffers)
        text = jax.tree_util.tree_map(jnp.array, {"text_model": self.base_params["text"]["text_model"]})
        return {UNET: unet, TEXT: text}

    def _table(self, params):
        """The context table [U + 1, 77, D] of the batch's captions and the empty prompt: the frozen
        base's, computed once, or the trained text tower's on the current params."""
        if self.table_ids is None:
            raise ConfigError("VideoTask.loss_fn needs batch_arrays(...) first (the text context table).")
        if not self.trains_text:
            return self.table
        from jaxgen.pipelines.stable_diffusion import prompt_context

        return prompt_context(self.ldm.text_encoder, params[TEXT], self.table_ids).astype(jnp.float32)

    def _denoise(self, params, zt, t, ctx, key):
        """The U-Net on clips [B, F, h, w, c], with the temporal dropout when video.temporal_dropout."""
        if bool(self.config.video.temporal_dropout):
            return self.model.apply({"params": params}, zt, t, ctx, deterministic=False, rngs={"dropout": key})
        return self.model.apply({"params": params}, zt, t, ctx)

    def loss_fn(self, params, batch, key):
        table = self._table(params)
        unet = self.unet_params(params)
        p = float(self.config.video.caption_dropout)
        k_clip, k_drop, k_img, k_img_drop = jax.random.split(key, 4)
        # one t and one caption draw per clip, noise per frame: [B, F, h, w, c] is one example each
        zt, t, target, ctx, _ = self.diffusion_inputs(k_clip, batch["latent_mean"], batch["latent_std"],
                                                      batch["caption"], table, p)
        loss, mse = self.weighted_mse(self._denoise(unet, zt, t, ctx, k_drop), target, t)
        metrics = {"mse": mse}
        k = self.joint_images
        if k:
            # K still images as one-frame clips [K, 1, h, w, c]
            zi, ti, target_i, ctx_i, _ = self.diffusion_inputs(
                k_img, batch["image_mean"][:k, None], batch["image_std"][:k, None], batch["image_caption"][:k],
                table, p)
            loss_i, mse_i = self.weighted_mse(self._denoise(unet, zi, ti, ctx_i, k_img_drop), target_i, ti)
            b = zt.shape[0]
            loss = (b * loss + k * loss_i) / (b + k)
            metrics["mse_images"] = mse_i
        return loss, metrics

    # -- the run ---------------------------------------------------------------------------------
    def pipeline(self, params):
        """A ``jaxgen.TextToVideoSDPipeline`` of this U-Net (params) and the base's autoencoder
        (with its scaling factor), text encoder, tokenizer and default scheduler; cached for the
        params last asked for (by identity)."""
        from jaxgen.pipelines.text_to_video import TextToVideoSDPipeline

        if self._pipe is not None and self._pipe[0] is params:
            return self._pipe[1]
        c = self.pipeline_components(params)
        pipe = TextToVideoSDPipeline(c["unet"][0], c["vae"][0], c["text_encoder"][0],
                                     {k: c[k][1] for k in ("unet", "vae", "text_encoder")},
                                     c["tokenizer"], c["scheduler"])
        self._pipe = (params, pipe)
        return pipe

    def sample(self, params, num, seed=0, labels=None, prompts=None, num_steps=None, guidance_scale=None,
               scheduler=None, num_frames=None) -> np.ndarray:
        """``num`` clips uint8 [num, F, H, W, 3] for ``prompts`` (None: the 90 colour x shape x
        direction prompts in order, repeated; one str for all; or num str). num_frames: default
        video.num_frames. Settings None: config.sampling's, else the base run's (module docstring)."""
        from jaxgen.eval.video import motion_prompts

        if labels is not None:
            raise DataError("this run is text-conditioned: pass prompts=, not labels.")
        if prompts is None:
            every = motion_prompts()[0]
            prompts = [every[i % len(every)] for i in range(max(int(num), 1))][:int(num)]
        prompts = self.ldm.sample_prompts(num, prompts)
        f = self.num_frames if num_frames is None else num_frames
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1:
            raise DataError(f"num_frames={num_frames!r}: the clips' frame count, an int >= 1.")
        steps, g, sched = self.sampling_settings(num_steps, guidance_scale, scheduler)
        pipe = self.pipeline(params)
        key = jax.random.key(seed)
        n, (height, width, _) = len(prompts), self.image_shape
        latents = np.asarray(jax.random.normal(jax.random.fold_in(key, _KEY_LATENTS),
                                               (n, int(f), *self.latent_shape), jnp.float32))   # [n, F, h, w, c]
        steps_root = jax.random.fold_in(key, _KEY_STEPS)
        size = min(self.sampling_batch_size, n)
        out = []
        for i, (a, b) in enumerate(chunk_bounds(n, size)):
            rows = pad_rows(np.arange(a, b), size)                           # [size] prompt indices
            clips = pipe([prompts[r] for r in rows], num_frames=int(f), height=height, width=width,
                         num_inference_steps=steps, guidance_scale=g, latents=latents[rows], scheduler=sched,
                         seed=jax.random.fold_in(steps_root, i))
            out.append(clips[:b - a])                                        # [size, F, H, W, 3] in [0, 1]
        return unit_to_uint8(np.concatenate(out), what="the text-to-video run")

    def pipeline_components(self, params) -> dict[str, Any]:
        """What a diffusers TextToVideoSDPipeline folder holds (``train.export``): this U-Net, the
        base's autoencoder (with its scaling factor), the text tower (the run's when it trains one),
        the base's tokenizer and default scheduler."""
        c = self.ldm.pipeline_components(self.base_params)
        c["unet"] = (self.model, self.unet_params(params))
        c["text_encoder"] = (c["text_encoder"][0], self.text_params(params))
        c["pipeline_class"] = "TextToVideoSDPipeline"
        return c

    @property
    def sampling_batch_size(self) -> int:
        """Clips per compiled pipeline call (config.sampling.batch_size)."""
        return int(self.config.sampling.batch_size)

    def encode_text(self, params, texts) -> np.ndarray:
        """The base's CLIP text embeddings, through the run's text tower when it trains one."""
        text = {**self.base_params["text"], "text_model": self.text_params(params)["text_model"]}
        return self.ldm.encode_text({**self.base_params, "text": text}, texts)

    def preview(self, params, batch):
        from jaxgen.eval.video import clip_strip, motion_prompts

        prompts = motion_prompts()[0][::18][:5]          # one per direction
        return clip_strip(self.sample(params, len(prompts), prompts=prompts))

    def evaluate(self, run, out_dir: str) -> dict:
        from jaxgen.eval import video as video_eval

        return video_eval.evaluate(run, out_dir, self.config.get("eval", None))
