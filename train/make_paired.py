"""python -m train.make_paired --out DIR [--train N] [--test N] [--seed S]

Writes an example paired image folder (grey shapes beside their colour originals, with captions)
that configs/paired_colorize.py trains on: DIR/{train,test}/{source,image}/*.png and
DIR/{train,test}/metadata.jsonl. See jaxgen/data/paired_example.py for the layout.
"""
from __future__ import annotations

from absl import app, flags

from train import common

flags.DEFINE_string("out", None, "folder to write")
flags.DEFINE_integer("train", 1620, "pairs in the train split", lower_bound=1)
flags.DEFINE_integer("test", 324, "pairs in the test split", lower_bound=1)
flags.DEFINE_integer("seed", 0, "shapes jitter seed")
flags.mark_flags_as_required(["out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxgen.data.paired_example import write_paired_shapes

    F = flags.FLAGS
    counts = write_paired_shapes(F.out, {"train": F.train, "test": F.test}, seed=F.seed)
    print(f"wrote {counts} (source, image) pairs under {F.out}")


if __name__ == "__main__":
    common.run(main)
