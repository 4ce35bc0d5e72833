"""python -m train.eval --workdir DIR [--step N]

Evaluates the run in DIR with its task's metrics, writes DIR/eval.json (and PNGs under DIR/eval/)
and prints the metrics.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from train import common

flags.DEFINE_string("workdir", None, "run directory")
flags.DEFINE_integer("step", None, "checkpoint step (default: the newest intact one)", lower_bound=0)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.setup_logging()
    common.init_distributed()
    import jaxgen

    run = jaxgen.load_run(flags.FLAGS.workdir, step=flags.FLAGS.step)
    out_dir = os.path.join(run.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    metrics = {"step": run.step, **run.task.evaluate(run, out_dir)}
    with open(os.path.join(run.workdir, "eval.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {os.path.join(run.workdir, 'eval.json')} and images in {out_dir}")


if __name__ == "__main__":
    common.run(main)
