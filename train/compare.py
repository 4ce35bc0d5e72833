"""python -m train.compare FOLDER [--seed S] [--batch B] [--size N] [--tolerance T] [--rows N]

Loads a diffusers / transformers folder in jaxgen and in PyTorch, runs both on the same random
inputs and prints the relative error of the output and of every submodule's output in PyTorch's
execution order, naming the first module that diverges. Exit status 1 when the output's error is
above the tolerance.
"""
from __future__ import annotations

import sys

from absl import app, flags

from train import common

flags.DEFINE_integer("seed", 0, "input seed")
flags.DEFINE_integer("batch", 2, "batch size of the random inputs", lower_bound=1)
flags.DEFINE_integer("size", None, "spatial size of image inputs (default: the config's)", lower_bound=1)
flags.DEFINE_float("tolerance", 1e-5, "relative error above which a module counts as diverged", lower_bound=0)
flags.DEFINE_integer("rows", None, "print at most this many module rows (default: all)", lower_bound=0)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m train.compare FOLDER")
    from jaxgen.convert.compare import compare_folder

    F = flags.FLAGS
    report = compare_folder(argv[1], seed=F.seed, batch=F.batch, size=F.size, tolerance=F.tolerance)
    print(report.format(F.rows))
    sys.exit(0 if report.output_error <= F.tolerance else 1)


if __name__ == "__main__":
    common.run(main)
