"""python -m train --config configs/NAME.py[:ARG] --workdir DIR [--config.FIELD=VALUE ...]

Trains the config in DIR; a second call with the same DIR resumes from its latest checkpoint.
Multi-process: add --coordinator HOST:PORT --num_processes N --process_id I on every process
(or --distributed on a cluster JAX auto-detects); see the README.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from train import common

config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG]", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, images)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.setup_logging()
    common.init_distributed()
    from jaxgen.errors import JaxgenError
    from jaxgen.training.trainer import train

    try:
        run = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except JaxgenError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"trained {run.workdir} to step {run.step}: checkpoints in {run.workdir}/checkpoints, "
          f"metrics in {run.workdir}/metrics.jsonl, images in {run.workdir}/images")


if __name__ == "__main__":
    app.run(main)
