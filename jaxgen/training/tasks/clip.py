"""CLIP: contrastive image-text training of ``jaxgen.nn.clip.CLIPModel`` on a captioned dataset.

Objective: CLIP's symmetric cross-entropy over the *global* batch — every image of the step's
batch against every caption of it (``jaxgen.clip_utils.clip_loss``). The loss is one plain
full-batch computation; under jit with the batch sharded over the mesh, XLA gathers what each
device needs, so the value does not depend on the device count (nothing is computed per shard).
The temperature is learned as CLIP's: ``logit_scale`` starts at log(1/0.07) and the scale used is
exp(min(logit_scale, log(max_logit_scale))), max_logit_scale = 100 (the gradient is zero above).

Tokenizer: ``attach(workdir, training=True)`` learns a CLIP-format byte-level BPE vocabulary on
the training captions (``jaxgen.tokenizer.train_tokenizer``, deterministic, so every process
trains the same one in memory); process 0 writes it to ``DIR/tokenizer``. ``load_run``
(training=False) reads ``DIR/tokenizer``. The vocabulary is laid out as CLIP's, so its last two
ids are the start and end tokens: ``model.text_config`` must say vocab_size = V,
bos_token_id = V - 2, eos_token_id = pad_token_id = V - 1 for the V the captions support.

Captions are tokenized on the host: ``batch_arrays`` gives ``input_ids`` int32 [N, 77] (the
canonical caption) and, with ``data.augment_captions``, ``alt_input_ids`` int32 [N, T - 1, 77]
(the dataset's other phrasings); each step picks one of the T phrasings per example from the
step's key. The text tower is causal and pools at the first end token, so the positions after it
cannot change the embedding: training reads only the first ``tokenizer.train_context`` positions
(checked to hold every caption), and ``encode_text`` reads up to the longest text of each call.

Images: uint8 NHWC at the dataset's resolution; inside, CLIP's pixel normalisation
(``clip_pixel_values``: OpenAI CLIP's mean/std for RGB, mean = std = 0.5 for one channel).

Evaluation (``python -m train.eval``): zero-shot classification of every attribute the dataset
describes (shapes: shape, color, size, position and the whole combination; digits: the digit) on
the held-out split and the test split: one class weight per caption class, averaged over the
caption templates (prompt ensembling), and an attribute read from the classes' probabilities
summed per value (``ClipTask.zero_shot``); for shapes also on 1,800 independent renders
(``jaxgen.data.shapes_render.independent_split``: all 180 combinations, sub-pixel geometry, another
rasteriser), with per-value prompt sets too (``ClipTask.value_prompt_zero_shot``); image->text
and text->image retrieval recall@1/5 on the test split; and a similarity-matrix PNG.
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import clip_utils
from jaxgen.data.chunks import map_chunked
from jaxgen.data.fields import Input
from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.clip import CLIP_MEAN, CLIP_STD, clip_pixel_values
from jaxgen.training.config_values import check_range
from jaxgen.training.tasks.base import Task

CONTEXT_LENGTH = 77     # input_ids are [N, 77], CLIP's text context
TOKENIZER_DIR = "tokenizer"
TEXT_BUCKET = 8         # encode_text pads its context up to a multiple of this (fewer compilations)
CHUNK = 256             # examples per jitted call when encoding
INDEPENDENT_EXAMPLES = 1800   # shapes: independent renders zero-shot is measured on (10 per combination)
INDEPENDENT_SEED = 0


# ------------------------------------------------------------------------------------------------
# caption spaces: the structured description some datasets give of their captions
# ------------------------------------------------------------------------------------------------
class CaptionSpace:
    """The classes of a dataset whose captions come from templates (shapes, digits).

    num_classes: K, the number of distinct canonical captions (shapes: 180 attribute
      combinations; digits: 10 digits).
    num_templates: T, the phrasings of each class (template 0 is the canonical caption).
    caption(k, t) -> str: phrasing t of class k.
    attributes: name -> int [K], the value of each attribute per class (shapes: shape, color,
      size, position; digits: digit), with value names in ``attribute_names[name]``.
    classes_of(ds) -> int [N]: the class of every example of an ArrayDataset.
    """

    def __init__(self, name: str):
        if name == "shapes":
            from jaxgen.data import shapes

            self.num_classes = shapes.NUM_COMBINATIONS
            self.num_templates = len(shapes.CAPTION_TEMPLATES)
            combo = shapes.combination_attributes(np.arange(self.num_classes))
            self.attributes = {a: np.asarray(combo[a]) for a in shapes.ATTRIBUTES}
            self.attribute_names = {a: shapes.ATTRIBUTE_NAMES[a] for a in shapes.ATTRIBUTES}
            self._caption = lambda k, t: shapes.caption(*(int(combo[a][k]) for a in shapes.ATTRIBUTES),
                                                        template=t)
            self._partial = lambda k, keep: shapes.partial_caption(
                *(int(combo[a][k]) for a in shapes.ATTRIBUTES), keep)
        elif name == "digits":
            from jaxgen.data import digits

            self.num_classes = digits.NUM_CLASSES
            self.num_templates = len(digits.CAPTION_TEMPLATES)
            self.attributes = {"digit": np.arange(self.num_classes)}
            self.attribute_names = {"digit": digits.DIGIT_WORDS}
            self._caption = lambda k, t: digits.caption(int(k), template=t)
            self._partial = None
        else:
            raise ConfigError(f"dataset {name!r} has no caption templates; CaptionSpace knows "
                              "'shapes' and 'digits'.")

    @staticmethod
    def of(name: str) -> "CaptionSpace | None":
        return CaptionSpace(name) if name in ("shapes", "digits") else None

    def caption(self, k: int, t: int = 0) -> str:
        return self._caption(k, t)

    @property
    def subsets(self) -> tuple[tuple[str, ...], ...]:
        """The proper, non-empty subsets of the attributes a partial caption can name (shapes: 14),
        in a fixed order; () for a space whose captions name one attribute."""
        names = tuple(self.attributes)
        if self._partial is None or len(names) < 2:
            return ()
        return tuple(tuple(a for j, a in enumerate(names) if m >> j & 1) for m in range(1, 2 ** len(names) - 1))

    def partial_caption(self, k: int, keep) -> str:
        """Class k's caption naming only the attributes in ``keep`` (shapes.partial_caption)."""
        if self._partial is None:
            raise ConfigError("this dataset's captions name one attribute: there are no partial captions.")
        return self._partial(k, keep)

    def classes_of(self, ds) -> np.ndarray:
        if ds.labels is None:
            raise DataError(f"{ds.name}/{ds.split} has no labels; its captions' classes are unknown.")
        return ds.labels.astype(np.int64)   # shapes: the combination index; digits: the digit


# ------------------------------------------------------------------------------------------------
# the task
# ------------------------------------------------------------------------------------------------
class ClipTask(Task):
    """Trains ``CLIPModel(input_ids, pixel_values)`` with CLIP's contrastive loss."""

    name = "clip"
    abilities = ("encode_text", "encode_image", "tokenizer")

    def __init__(self, config):
        super().__init__(config)
        self.text_cfg = dict(self.model.text_config)       # complete CLIPTextModel fields
        self.vision_cfg = dict(self.model.vision_config)   # complete CLIPVisionModel fields
        if self.text_cfg["max_position_embeddings"] != CONTEXT_LENGTH:
            raise ConfigError(f"model.text_config.max_position_embeddings="
                              f"{self.text_cfg['max_position_embeddings']}: CLIP runs tokenize to "
                              f"{CONTEXT_LENGTH} positions; set it to {CONTEXT_LENGTH}.")
        self.train_context = int(config.tokenizer.train_context)
        check_range("tokenizer.train_context", self.train_context, 2, CONTEXT_LENGTH)
        self.max_logit_scale = check_range("objective.max_logit_scale", config.objective.max_logit_scale, 0.0,
                                           low_open=True, hint="CLIP uses 100")
        self.space = CaptionSpace.of(config.data.name)
        if config.data.augment_captions and self.space is None:
            raise ConfigError(f"data.augment_captions=True, but dataset {config.data.name!r} has no "
                              "other caption phrasings; set data.augment_captions=False.")
        # the fraction of a step's examples whose caption names only some attributes
        self.partial = check_range("data.partial_captions", config.data.get("partial_captions", 0.0) or 0.0,
                                   0.0, 1.0, high_open=True, hint="0 turns partial captions off")
        if self.partial and (self.space is None or not self.space.subsets):
            raise ConfigError(f"data.partial_captions={self.partial}: dataset {config.data.name!r} has no "
                              "captions that name several attributes; set data.partial_captions=0.")
        # examples of the same class (the same canonical caption) as positives of each other
        self.class_positives = config.objective.get("class_positives", False)
        if not isinstance(self.class_positives, bool):
            raise ConfigError(f"objective.class_positives={self.class_positives!r}: True or False.")
        if self.class_positives and self.space is None:
            raise ConfigError(f"objective.class_positives=True: dataset {config.data.name!r} has no caption "
                              "classes to tell which examples share a caption; set it to False.")
        # soft targets graded by shared attributes: text j's weight for image i is
        # exp(beta * (shared(i, j) - A)), 1 for the same caption class
        self.attribute_targets = check_range("objective.attribute_targets",
                                             config.objective.get("attribute_targets", 0.0) or 0.0, 0.0,
                                             hint="0 turns attribute targets off")
        if self.attribute_targets and (self.space is None or len(self.space.attributes) < 2):
            raise ConfigError(f"objective.attribute_targets={self.attribute_targets}: dataset "
                              f"{config.data.name!r} has no captions naming several attributes; set it to 0.")
        if self.attribute_targets and (self.class_positives or self.partial):
            raise ConfigError(f"objective.attribute_targets={self.attribute_targets} replaces the loss's "
                              "positives: set objective.class_positives=False and data.partial_captions=0.")
        channels = self.vision_cfg["num_channels"]
        self.pixel_mean = CLIP_MEAN if channels == 3 else (0.5,) * channels
        self.pixel_std = CLIP_STD if channels == 3 else (0.5,) * channels
        self._tokenizer = None
        self._workdir = None
        self._data: dict[str, Any] = {}
        self._jitted: dict[str, Any] = {}

    # -- tokenizer ------------------------------------------------------------------------------
    @property
    def templates(self) -> tuple[int, ...]:
        """The caption templates trained on (all with augmentation, else the canonical one)."""
        if self.space is None:
            return (0,)
        return tuple(range(self.space.num_templates)) if self.config.data.augment_captions else (0,)

    def training_captions(self) -> list[str]:
        """The texts the tokenizer learns from: every training caption, in every phrasing trained on."""
        ds = self.load_data(self.config.data.train_split)
        if ds.captions is None:
            raise DataError(f"{ds.name}/{ds.split} has no captions; CLIP needs captioned images.")
        if len(self.templates) == 1:
            return list(ds.captions)
        classes = self.space.classes_of(ds)
        phr = {k: [self.space.caption(k, t) for t in self.templates] for k in np.unique(classes)}
        return [text for k in classes for text in phr[k]] + self.partial_texts(np.unique(classes))

    def partial_texts(self, classes) -> list[str]:
        """With data.partial_captions: every partial caption of the given classes, once each."""
        if not self.partial:
            return []
        return [self.space.partial_caption(int(k), keep) for k in classes for keep in self.space.subsets]

    def make_tokenizer(self):
        """Learn the run's vocabulary on the training captions (deterministic) and check that it
        fits model.text_config. Returns a jaxgen.tokenizer.CLIPTokenizer."""
        from jaxgen.tokenizer import train_tokenizer

        vocab = self.text_cfg["vocab_size"]
        tok = train_tokenizer(self.training_captions(), vocab,
                              min_frequency=int(self.config.tokenizer.min_frequency))
        self.check_tokenizer(tok)
        return tok

    def check_tokenizer(self, tok) -> None:
        t = self.text_cfg
        want = {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        have = {k: t[k] for k in want}
        if have != want:
            n = tok.vocab_size
            raise ConfigError(
                f"the tokenizer learned on the training captions has {n} ids (start {tok.bos_token_id}, "
                f"end/pad {tok.eos_token_id}), but model.text_config says "
                f"{', '.join(f'{k}={v}' for k, v in have.items())}: set model.text_config.vocab_size={n}, "
                f"bos_token_id={n - 2}, eos_token_id={n - 1}, pad_token_id={n - 1}. These captions "
                f"support at most {n} ids; a smaller vocab_size V also works, with start and end ids "
                f"V - 2 and V - 1 (CLIP's layout puts them last).")

    def attach(self, workdir: str, training: bool) -> None:
        """Train (training=True, every process; process 0 writes DIR/tokenizer) or read
        (training=False) the run's tokenizer. A resumed run's saved tokenizer must equal the
        one learned again from the captions."""
        from jaxgen.tokenizer import load_tokenizer

        folder = os.path.join(workdir, TOKENIZER_DIR)
        self._workdir = os.path.abspath(workdir)
        if not training:
            if not os.path.isdir(folder):
                raise ConfigError(f"{folder} is missing: a CLIP run keeps the tokenizer it trained with "
                                  "there. Copy the run directory whole, or train the run again.")
            tok = load_tokenizer(folder)
            self.check_tokenizer(tok)
            self._tokenizer = tok
            return
        tok = self.make_tokenizer()
        if os.path.isdir(folder):
            saved = load_tokenizer(folder)
            if saved.vocab != tok.vocab or saved.merges != tok.merges:
                raise ConfigError(f"{folder} holds a tokenizer that differs from the one learned on "
                                  "this config's training captions (did the data change?). Resume with "
                                  "the same data, or train in a new --workdir.")
        elif jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=workdir)
            tok.save(tmp)
            os.replace(tmp, folder)   # atomic: readers never see a half-written folder
        self._tokenizer = tok

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise ConfigError("this CLIP task has no tokenizer yet: use jaxgen.load_run(DIR), or call "
                              "task.attach(workdir, training) first.")
        return self._tokenizer

    def tokenizer_for(self, workdir: str):
        """The tokenizer of the run in ``workdir`` (the attached one, or DIR/tokenizer)."""
        if self._tokenizer is not None and self._workdir == os.path.abspath(workdir):
            return self._tokenizer
        from jaxgen.tokenizer import load_tokenizer

        return load_tokenizer(os.path.join(workdir, TOKENIZER_DIR))

    # -- data -----------------------------------------------------------------------------------
    def load_data(self, split: str):
        """The ArrayDataset of ``split``, read once per task."""
        if split not in self._data:
            self._data[split] = super().load_data(split)
        return self._data[split]

    def inputs(self):
        """{"image": uint8 [S, S, C] (the vision tower's size), "caption": text}."""
        s, c = self.vision_cfg["image_size"], self.vision_cfg["num_channels"]
        return {"image": Input("image", (s, s, c), doc="the image"),
                "caption": Input("text", doc="its caption: contrastive training pairs images with captions")}

    def batch_arrays(self, ds) -> dict[str, np.ndarray]:
        """{"image": uint8 [N, H, W, C], "input_ids": int32 [N, 77] (canonical captions), and with
        data.augment_captions "alt_input_ids": int32 [N, T - 1, 77] (the other phrasings); with
        data.partial_captions "partial_input_ids": int32 [N, S, 77] (the captions naming each of
        the S attribute subsets) and "attributes": int32 [N, A] (each example's values); with
        objective.class_positives "class_id": int32 [N] (the caption class of each example)}."""
        fields = self.gather(ds)
        tok = self.tokenizer
        arrays = {"image": fields["image"], "input_ids": tok(fields["caption"])}
        if len(self.templates) > 1 or self.partial or self.class_positives or self.attribute_targets:
            classes = self.space.classes_of(ds)
            uniq, inverse = np.unique(classes, return_inverse=True)
        if self.class_positives:
            arrays["class_id"] = classes.astype(np.int32)                  # [N]
        if len(self.templates) > 1:
            alt_text = [self.space.caption(k, t) for k in uniq for t in self.templates[1:]]
            alt = tok(alt_text).reshape(len(uniq), len(self.templates) - 1, CONTEXT_LENGTH)
            arrays["alt_input_ids"] = alt[inverse]                       # [N, T - 1, 77]
        if self.partial or self.attribute_targets:
            arrays["attributes"] = np.stack([self.space.attributes[a][classes] for a in self.space.attributes],
                                            axis=1).astype(np.int32)         # [N, A]
        if self.partial:
            subsets = self.space.subsets
            part = tok(self.partial_texts(uniq)).reshape(len(uniq), len(subsets), CONTEXT_LENGTH)
            arrays["partial_input_ids"] = part[inverse]                  # [N, S, 77]
        ends = _text_lengths(np.concatenate([arrays["input_ids"]] + [
            arrays[k].reshape(-1, CONTEXT_LENGTH) for k in ("alt_input_ids", "partial_input_ids") if k in arrays]),
            tok.eos_token_id)
        if ends.max() > self.train_context:
            raise ConfigError(f"a training caption takes {ends.max()} tokens (start and end included) but "
                              f"tokenizer.train_context={self.train_context}: set it to at least "
                              f"{ends.max()} (at most {CONTEXT_LENGTH}).")
        return arrays

    def example_batch(self) -> dict:
        s, c = self.vision_cfg["image_size"], self.vision_cfg["num_channels"]
        return {"image": np.zeros((1, s, s, c), np.uint8),
                "input_ids": np.zeros((1, CONTEXT_LENGTH), np.int32)}

    def pixel_values(self, images: jax.Array) -> jax.Array:
        """uint8 [B, S, S, C] -> float32 [B, S, S, C], CLIP-normalised."""
        return clip_pixel_values(images, mean=self.pixel_mean, std=self.pixel_std)

    # -- model ----------------------------------------------------------------------------------
    def init_params(self, key: jax.Array, batch: dict) -> Any:
        ids = jnp.asarray(batch["input_ids"][:1, :self.train_context])
        return self.model.init(key, ids, self.pixel_values(jnp.asarray(batch["image"][:1])))["params"]

    def clamped_logit_scale(self, params) -> jax.Array:
        """min(logit_scale, log(max_logit_scale)), float32 scalar (the log inverse temperature used)."""
        return jnp.minimum(params["logit_scale"].astype(jnp.float32), math.log(self.max_logit_scale))

    def pick_captions(self, batch: dict, key: jax.Array) -> jax.Array:
        """The step's caption of each example, int32 [B, 77]: with alt_input_ids, phrasing
        u ~ Uniform{0..T-1} per example (drawn for the global batch), 0 = canonical."""
        ids = batch["input_ids"]
        if "alt_input_ids" not in batch:
            return ids
        every = jnp.concatenate([ids[:, None], batch["alt_input_ids"]], axis=1)   # [B, T, 77]
        pick = jax.random.randint(key, (ids.shape[0],), 0, every.shape[1])       # [B]
        return jnp.take_along_axis(every, pick[:, None, None], axis=1)[:, 0]      # [B, 77]

    def pick_partial(self, batch: dict, ids: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """data.partial_captions = p: each example's caption is, with probability p, one naming a
        uniformly drawn proper subset of its attributes (batch["partial_input_ids"] [B, S, 77]),
        else ``ids``. Returns (ids int32 [B, 77], positives bool [B, B]): text j fits image i when
        every attribute text j names has image i's value (the diagonal, and identical captions,
        included), for clip_loss's multi-positive form."""
        b = ids.shape[0]
        k_use, k_subset = jax.random.split(key)
        use = jax.random.uniform(k_use, (b,)) < self.partial                         # [B]
        subset = jax.random.randint(k_subset, (b,), 0, batch["partial_input_ids"].shape[1])
        partial = jnp.take_along_axis(batch["partial_input_ids"], subset[:, None, None], axis=1)[:, 0]
        ids = jnp.where(use[:, None], partial, ids)
        names = list(self.space.attributes)
        masks = jnp.asarray([[a in keep for a in names] for keep in self.space.subsets])   # [S, A]
        named = jnp.where(use[:, None], masks[subset], True)                         # [B, A] text j names a
        attrs = batch["attributes"]                                                  # [B, A]
        agree = attrs[:, None, :] == attrs[None, :, :]                               # [B(image), B(text), A]
        return ids, jnp.all(agree | ~named[None, :, :], axis=-1)

    def loss_fn(self, params, batch, key):
        """CLIP loss over the whole (global) batch: batch["image"] uint8 [B, S, S, C],
        batch["input_ids"] int32 [B, 77] (+ "alt_input_ids" [B, T - 1, 77]; with
        data.partial_captions "partial_input_ids" [B, S, 77] and "attributes" [B, A], and the
        multi-positive loss; with objective.class_positives "class_id" [B]: the examples of one
        caption class are positives of each other in that loss, not negatives; with
        objective.attribute_targets = beta "attributes" [B, A] and clip_loss's soft targets
        exp(beta * (shared - A))). Returns (loss float32 scalar, {"logit_scale_exp":
        exp(clamped logit_scale), the inverse temperature in [0, max_logit_scale]; "i2t_top1":
        fraction of images whose most similar caption in the batch is theirs (or the same text,
        or one of the same class), in [0, 1]})."""
        ids = self.pick_captions(batch, jax.random.fold_in(key, 0))
        positives = targets = None
        if self.attribute_targets:      # graded by the attributes image i and caption j share
            attrs = batch["attributes"]
            shared = jnp.sum(attrs[:, None, :] == attrs[None, :, :], axis=-1)         # [B, B]
            targets = jnp.exp(self.attribute_targets * (shared - attrs.shape[1]).astype(jnp.float32))
        if self.class_positives:        # same caption class: a fitting pair, not a negative
            positives = batch["class_id"][:, None] == batch["class_id"][None, :]
        if self.partial:                # its rule includes the same class for full captions
            ids, fits = self.pick_partial(batch, ids, jax.random.fold_in(key, 1))
            positives = fits if positives is None else positives | fits
        ids = ids[:, :self.train_context]
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        out = self.model.apply({"params": params}, ids, self.pixel_values(batch["image"]).astype(dtype))
        scale = self.clamped_logit_scale(params)
        loss = clip_utils.clip_loss(out.image_embeds, out.text_embeds, scale, positives=positives,
                                    targets=targets)
        # in-batch accuracy: the own caption (or an identical one, or one that fits) scores highest
        sim = out.image_embeds @ out.text_embeds.T                                   # [B, B]
        same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)                  # [B, B]
        if positives is not None:
            same = same | positives
        if targets is not None:         # weight 1 exactly: the same caption class
            same = same | (targets == 1.0)
        best = jnp.argmax(sim, axis=1)
        top1 = jnp.mean(jnp.take_along_axis(same, best[:, None], axis=1))
        return loss, {"logit_scale_exp": jnp.exp(scale), "i2t_top1": top1}

    # -- Run abilities --------------------------------------------------------------------------
    def _fn(self, name: str):
        if name not in self._jitted:
            if name == "text":
                fn = lambda p, ids: clip_utils.l2_normalize(
                    self.model.apply({"params": p}, ids, method="get_text_features"))
            else:
                fn = lambda p, x: clip_utils.l2_normalize(
                    self.model.apply({"params": p}, self.pixel_values(x), method="get_image_features"))
            self._jitted[name] = jax.jit(fn)
        return self._jitted[name]

    def encode_text(self, params, texts: str | Sequence[str]) -> np.ndarray:
        """texts: a str or a list of N str -> float32 [N, P], L2-normalised text embeddings."""
        ids = self.tokenizer([texts] if isinstance(texts, str) else list(texts))     # [N, 77]
        if len(ids) == 0:
            return np.zeros((0, self.model.projection_dim), np.float32)
        # causal tower, pooled at the first end token: later positions cannot change the result
        length = int(_text_lengths(ids, self.tokenizer.eos_token_id).max())
        length = min(CONTEXT_LENGTH, -(-length // TEXT_BUCKET) * TEXT_BUCKET)
        return _chunked(self._fn("text"), params, ids[:, :length])

    def encode_image(self, params, images) -> np.ndarray:
        """images: uint8 [N, S, S, C] -> float32 [N, P], L2-normalised image embeddings."""
        images = self.check_images(images)
        if len(images) == 0:
            return np.zeros((0, self.model.projection_dim), np.float32)
        return _chunked(self._fn("image"), params, images)

    # -- evaluation -----------------------------------------------------------------------------
    def class_embeddings(self, run) -> np.ndarray:
        """Text embeddings of every caption class in every template trained on: float32
        [K, T, P] (template index 0 is the canonical caption)."""
        k, t = self.space.num_classes, self.templates
        texts = [self.space.caption(c, j) for c in range(k) for j in t]
        return run.encode_text(texts).reshape(k, len(t), -1)

    def zero_shot(self, image_embeds: np.ndarray, classes: np.ndarray, class_embeds: np.ndarray,
                  logit_scale) -> dict[str, float]:
        """Zero-shot accuracy of every attribute, with prompt ensembles.

        image_embeds: float32 [N, P]; classes: int [N], each image's true class (attribute
        combination); class_embeds: float32 [K, T, P] from ``class_embeddings``; logit_scale: the
        log inverse temperature. Each class weight averages its T normalised template embeddings
        (CLIP's prompt ensembling); p(k | image) = softmax over the K classes of
        exp(logit_scale) * cosine. An attribute's value is predicted by its marginal probability,
        p(a = v | image) = sum of p(k | image) over the classes k with a = v (every phrasing of
        every value of the other attributes), and "combination" is argmax_k p(k | image): right
        only when every attribute is. Returns {attribute: accuracy in [0, 1]}.
        """
        probs = np.asarray(_class_probs(image_embeds, class_embeds, logit_scale), np.float64)  # [N, K]
        out = {}
        for attr, value_of in self.space.attributes.items():
            values = len(self.space.attribute_names[attr])
            marginal = probs @ (value_of[:, None] == np.arange(values)[None, :])    # [N, V]
            out[attr] = float(np.mean(np.argmax(marginal, axis=1) == value_of[classes]))
        if len(self.space.attributes) > 1:
            out["combination"] = float(np.mean(np.argmax(probs, axis=1) == classes))
        return out

    def value_prompt_zero_shot(self, image_embeds: np.ndarray, classes: np.ndarray,
                               class_embeds: np.ndarray) -> dict[str, float]:
        """Zero-shot accuracy of every attribute with one prompt set per value: the weight of
        value v of attribute a averages the normalised embeddings of every canonical caption with
        a = v (shapes colour red: the 30 captions "a small red circle on the left", ...), and an
        image's value is the one of highest cosine. image_embeds float32 [N, P]; classes int [N];
        class_embeds float32 [K, T, P] (template 0 canonical). Returns {attribute: accuracy}."""
        out = {}
        for attr, value_of in self.space.attributes.items():
            values = len(self.space.attribute_names[attr])
            members = np.stack([np.nonzero(value_of == v)[0] for v in range(values)])   # [V, K / V]
            weights = np.asarray(clip_utils.zero_shot_classifier(class_embeds[members, 0]))   # [V, P]
            out[attr] = float(np.mean(np.argmax(image_embeds @ weights.T, axis=1) == value_of[classes]))
        return out

    def independent_zero_shot(self, run, class_embeds: np.ndarray, logit_scale) -> dict:
        """shapes only: zero-shot on INDEPENDENT_EXAMPLES renders of ``shapes_render.independent_split``
        (all 180 combinations, sub-pixel geometry, area-coverage rasterisation, not the generator).
        Returns {"zero_shot_independent": {attribute: accuracy} by per-value prompt sets
        (``value_prompt_zero_shot``), and "independent_zero_shot_{attribute}" / "..._combination"
        by the class-marginal protocol of the held-out and test splits (``zero_shot``)}."""
        from jaxgen.data import shapes_render

        renders = shapes_render.independent_split(INDEPENDENT_EXAMPLES, INDEPENDENT_SEED)
        embeds = run.encode_image(renders["image"])
        out: dict[str, Any] = {"zero_shot_independent": self.value_prompt_zero_shot(
            embeds, renders["label"], class_embeds)}
        accs = self.zero_shot(embeds, renders["label"], class_embeds, logit_scale)
        out.update({f"independent_zero_shot_{attr}": acc for attr, acc in accs.items()})
        return out

    def caption_targets(self, run, ds, class_embeds: np.ndarray | None = None
                        ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The distinct captions of ``ds``, their embeddings and each image's caption.

        A split repeats captions (shapes test: 162 captions x 10 images). Returns (texts, list of
        U str; text_embeds float32 [U, P]; target int [N], the index of each image's caption).
        With class_embeds (structured datasets) the canonical captions' embeddings are taken
        from it instead of being computed again.
        """
        texts = sorted(set(ds.captions))
        index = {t: j for j, t in enumerate(texts)}
        target = np.asarray([index[c] for c in ds.captions])
        if class_embeds is None:
            return texts, run.encode_text(texts), target
        canonical = {self.space.caption(k, 0): k for k in range(self.space.num_classes)}
        unknown = [t for t in texts if t not in canonical]
        if unknown:
            raise DataError(f"{ds.name}/{ds.split}: caption {unknown[0]!r} is not a canonical caption "
                            "of the dataset's templates; the dataset and jaxgen.data disagree.")
        return texts, class_embeds[[canonical[t] for t in texts], 0], target

    def evaluate(self, run, out_dir: str) -> dict:
        """Zero-shot accuracies (held-out and test splits; shapes: independent renders too,
        ``independent_zero_shot``), image<->text retrieval recall@1/5 on the
        test split against its distinct captions (an image's relevant text is its caption, a
        caption's relevant images are all images with it), and similarity_matrix.png in out_dir."""
        cfg = self.config.data
        scale = self.clamped_logit_scale(run.params)
        out: dict[str, Any] = {"logit_scale_exp": float(np.exp(scale)),
                               "prompt_templates": len(self.templates)}
        splits = [s for s in (cfg.get("heldout_split", ""), cfg.eval_split) if s]
        data = {s: self.load_data(s) for s in splits}
        images = {s: run.encode_image(ds.images) for s, ds in data.items()}         # [N, P] each
        class_embeds = self.class_embeddings(run) if self.space is not None else None
        if class_embeds is not None:
            for s, ds in data.items():
                accs = self.zero_shot(images[s], self.space.classes_of(ds), class_embeds, scale)
                out.update({f"{s}_zero_shot_{attr}": acc for attr, acc in accs.items()})
        if cfg.name == "shapes":
            out.update(self.independent_zero_shot(run, class_embeds, scale))
        texts, text_embeds, target = self.caption_targets(run, data[cfg.eval_split], class_embeds)
        sim = images[cfg.eval_split] @ text_embeds.T                                 # [N, U]
        relevant = target[None, :] == np.arange(len(texts))[:, None]                 # [U, N]
        i2t, t2i = _recall(sim, target), _recall(sim.T, relevant)
        out.update({f"{cfg.eval_split}_image_to_text_R@{k}": float(v) for k, v in i2t.items()})
        out.update({f"{cfg.eval_split}_text_to_image_R@{k}": float(v) for k, v in t2i.items()})
        shown = splits[0]
        texts, text_embeds, _ = self.caption_targets(run, data[shown], class_embeds)
        similarity_png(os.path.join(out_dir, "similarity_matrix.png"), data[shown],
                       images[shown] @ text_embeds.T, texts,
                       title=f"{cfg.name}/{shown}: cosine similarity, one image per caption")
        return out


@jax.jit
def _class_probs(image_embeds, class_embeds, logit_scale):
    """p(class | image): float32 [N, K] from image_embeds [N, P] and class_embeds [K, T, P]."""
    classifier = clip_utils.zero_shot_classifier(class_embeds)                       # [K, P]
    return jax.nn.softmax(clip_utils.zero_shot_logits(image_embeds, classifier, logit_scale), axis=-1)


@jax.jit
def _recall(similarity, relevant):
    """clip_utils.recall_at_k at k = 1 and 5, compiled as one program: {k: float32 scalar}."""
    return clip_utils.recall_at_k(similarity, relevant, (1, 5))


def _chunked(fn, params, x: np.ndarray) -> np.ndarray:
    """fn(params, chunk) over x [N, ...] in chunks of at most CHUNK rows (padded by repeating the
    last row to a power of two, so calls of any size reuse a few compiled shapes): float32 [N, P]."""
    return map_chunked(lambda part: fn(params, part), [x], CHUNK, power_of_two=True)


def _text_lengths(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Positions used by each row of int [N, L] ids up to and including its first end token: int [N]."""
    if len(ids) == 0:
        return np.zeros((0,), np.int64)
    return np.argmax(ids == eos_id, axis=1) + 1


def similarity_png(path: str, ds, sim: np.ndarray, texts: list[str], title: str = "",
                   max_items: int = 18) -> str:
    """Heat map of image-caption cosine similarity for up to ``max_items`` distinct captions: one
    image per caption (its first example) as rows, with the image drawn left of its row, the
    captions as columns. sim: float [N_images, N_captions] over ``ds`` and ``texts``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_items, len(texts))
    rows = [ds.captions.index(texts[j]) for j in range(n)]      # the first image of each caption
    block = sim[np.asarray(rows)][:, :n]                          # [n, n]
    fig, ax = plt.subplots(figsize=(2 + 0.55 * n, 2.5 + 0.45 * n))
    im = ax.imshow(block, cmap="viridis", extent=(0, n, n, 0))
    grey = ds.images.shape[-1] == 1
    for r, i in enumerate(rows):
        ax.imshow(ds.images[i][..., 0] if grey else ds.images[i], cmap="gray" if grey else None,
                  extent=(-1.05, -0.05, r + 0.95, r + 0.05), interpolation="nearest")
    ax.set_xlim(-1.1, n)
    ax.set_ylim(n, 0)
    ax.set_xticks(np.arange(n) + 0.5)
    ax.set_xticklabels(texts[:n], rotation=70, ha="right", fontsize=7)
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
