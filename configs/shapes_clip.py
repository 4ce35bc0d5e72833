"""python -m train --config configs/shapes_clip.py --workdir runs/shapes_clip

CLIP on the embedded shapes (32x32 RGB, one coloured shape per image, 162 attribute combinations
in training, 18 held out): a small ViT (patch 8, width 64, 2 layers) and a causal text
transformer (width 64, 2 layers) trained with CLIP's contrastive loss over the global batch, the
temperature learned (logit_scale from log(1/0.07), clamped at log(100)), captions augmented with
the dataset's six phrasings and the BPE vocabulary learned from them. ``python -m train.eval --workdir runs/shapes_clip`` reports
zero-shot accuracy of colour, shape, size, position and the whole combination on the held-out
combinations, the test split and 1,800 renders by an independent rasteriser (prompt ensembles;
docs/CLIP.md), and retrieval recall@1/5 on the test split.
Arguments (comma-separated after ':'): tiny (seconds, for tests), canonical (train on the
canonical caption only, no phrasing augmentation), partial (a quarter of each step's captions name
only some attributes, "a circle", "a red shape on the left", with the multi-positive loss:
docs/CLIP.md, with the same-class positives), positives (the batch's examples of one caption class
count as positives of each other, objective.class_positives, instead of the graded targets),
instance (CLIP's own loss: every other example a negative).
By default each caption's target weight for an image is graded by the attributes they share
(objective.attribute_targets = 4: exp(4 * (shared - 4)), 1 for the same caption class).
"""
import math

import ml_collections

from configs.common import base_config, data_options, make_tiny, parse_arg


def clip_config(dataset: str, image_size: int, channels: int, patch_size: int, vocab_size: int,
                heldout_split: str = "") -> ml_collections.ConfigDict:
    """A CLIP run on an embedded captioned dataset (task "clip", model jaxgen.nn.clip:CLIPModel).

    vocab_size: V, the size of the BPE vocabulary learned from the training captions; CLIP's
    layout puts the start and end tokens last (ids V - 2 and V - 1), so the text config's token
    ids follow from V. The captions must support V (the task says so, with the largest V, if not).
    """
    c = base_config()
    c.task = "clip"
    c.model_class = "jaxgen.nn.clip:CLIPModel"
    width = 64
    c.model = ml_collections.ConfigDict({
        "text_config": {"vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 4 * width,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                        "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
                        "pad_token_id": vocab_size - 1, "projection_dim": 64},
        "vision_config": {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": image_size, "patch_size": patch_size,
                          "num_channels": channels, "hidden_act": "quick_gelu", "projection_dim": 64},
        "projection_dim": 64,
        "logit_scale_init_value": math.log(1 / 0.07),
    })
    c.data = ml_collections.ConfigDict({"name": dataset, "train_split": "train", "eval_split": "test",
                                        "heldout_split": heldout_split, "data_dir": "", "options": data_options(),
                                        "augment_captions": True,
                                        # the fraction of examples per step captioned with only some
                                        # attributes ("a circle", "a red shape on the left"; shapes)
                                        "partial_captions": 0.0})
    # train_context: positions of input_ids the training step reads (every caption must fit; the
    # causal text tower ignores what follows the end token, so this only saves compute)
    c.tokenizer = ml_collections.ConfigDict({"min_frequency": 2, "train_context": 16})
    # class_positives: examples with the same canonical caption count as positives of each other
    # (CLIP's own loss makes them negatives: one text must match one image and not its twin)
    c.objective = ml_collections.ConfigDict({"max_logit_scale": 100.0, "class_positives": False,
                                             "attribute_targets": 0.0})
    c.batch_size = 128
    c.total_steps = 1000
    c.checkpoint_every = 500
    c.log_every = 50
    c.image_every = 0            # no training previews: python -m train.eval writes the figures
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 1e-4
    return c


def make_tiny_clip(c: ml_collections.ConfigDict) -> None:
    """':tiny': make_tiny's 2 steps of batch 16, and one-layer towers of width 32."""
    make_tiny(c)
    for tower in (c.model.text_config, c.model.vision_config):
        tower.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "projection_dim": 16})
    c.model.projection_dim = 16


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "canonical", "partial", "positives", "instance"))
    # the whole vocabulary the captions support: every word of them becomes one token
    vocab = 578 if "canonical" in words else 596
    # patch 8: 4 x 4 patches + the class token (patch 4 gives 65 tokens and trains ~3x slower per
    # step on CPU; the targets are met in the 10-minute CPU budget with patch 8)
    c = clip_config("shapes", image_size=32, channels=3, patch_size=8, vocab_size=vocab,
                    heldout_split="heldout")
    c.data.augment_captions = "canonical" not in words
    # Zero-shot on the independent renders by per-value prompts (shape / colour / size / position,
    # mean of four seeds; docs/CLIP.md): CLIP's own loss (':instance') 0.829 / 0.967 / 0.959 / 0.875;
    # the batch's examples of one caption class as positives (':positives') 0.882 / 0.966 / 0.972 /
    # 0.919; soft targets graded by the attributes shared, exp(4 * (shared - 4)) (the default)
    # 0.996 / 1.000 / 1.000 / 0.998: the text embeddings become additive in the attributes.
    c.objective.class_positives = bool(words & {"positives", "partial"})
    c.objective.attribute_targets = 0.0 if words & {"positives", "partial", "instance"} else 4.0
    if "partial" in words:
        c.data.partial_captions = 0.25
    # continuous geometry within the spec (sub-pixel centres and widths, two rasterisers; generated
    # in memory), 100 examples per training combination: zero-shot then holds on renders by
    # another rasteriser (jaxgen.data.shapes_render; docs/ARCHITECTURE.md, CLIP runs)
    c.data.options.geometry = "continuous"
    c.data.options.num_examples = {"train": 100 * 162}
    if "tiny" in words:
        make_tiny_clip(c)
        c.data.options.num_examples = {"train": 4 * 162}
    return c
