"""python -m train --config configs/NAME.py[:ARG] --workdir DIR [--step N] [--config.FIELD=VALUE ...]

Trains the config in DIR; a second call with the same DIR resumes from its newest intact
checkpoint (a damaged newer one is reported, moved aside to DIR/checkpoints/STEP.damaged and
skipped). --step N resumes from checkpoint N instead; the steps after it are moved aside to
DIR/checkpoints/STEP.superseded (nothing is deleted).
Multi-process: add --coordinator HOST:PORT --num_processes N --process_id I on every process
(or --distributed on a cluster JAX auto-detects); see the README.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from train import common

config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG]", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, images)")
flags.DEFINE_integer("step", None, "resume from this checkpoint step (default: the newest intact one); "
                     "later steps are moved aside to DIR/checkpoints/STEP.superseded", lower_bound=0)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.setup_logging()
    common.init_distributed()
    from jaxgen.training.trainer import train

    run = train(flags.FLAGS.config, flags.FLAGS.workdir, step=flags.FLAGS.step)
    print(f"trained {run.workdir} to step {run.step}: checkpoints in {run.workdir}/checkpoints, "
          f"metrics in {run.workdir}/metrics.jsonl, images in {run.workdir}/images")


if __name__ == "__main__":
    common.run(main)
