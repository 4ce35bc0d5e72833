"""python -m train --config configs/digits_clip.py --workdir runs/digits_clip

CLIP on the embedded 8x8 digits and their template captions ("a handwritten digit seven", "the
number 7", ...): a small ViT (patch 2) and a small text transformer trained contrastively over
the global batch with a learned, clamped temperature, captions augmented with the six phrasings.
``python -m train.eval --workdir runs/digits_clip`` reports zero-shot digit accuracy on the test
split (prompt ensembles over the phrasings) and image<->text retrieval recall@1/5.
Arguments (comma-separated after ':'): tiny (seconds, for tests), canonical (no augmentation).
"""
from configs.common import parse_arg
from configs.shapes_clip import clip_config, make_tiny_clip


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny", "canonical"))
    # the whole vocabulary the captions support: every word of them becomes one token
    vocab = 555 if "canonical" in words else 577
    c = clip_config("digits", image_size=8, channels=1, patch_size=2, vocab_size=vocab)
    c.data.augment_captions = "canonical" not in words
    c.total_steps = 1000
    if "tiny" in words:
        make_tiny_clip(c)
    return c
