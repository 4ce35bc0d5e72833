"""What the CLI entry points share: logging set-up and multi-process initialisation."""
from __future__ import annotations

import logging
import os

from absl import flags

flags.DEFINE_string("coordinator", None, "host:port of process 0 for a multi-process run "
                    "(jax.distributed.initialize); omit on one host.")
flags.DEFINE_integer("num_processes", None, "number of processes in a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with cluster "
                  "auto-detection (SLURM, Cloud TPU, ...)")


def init_distributed() -> None:
    """jax.distributed.initialize when asked; CPU runs use gloo collectives."""
    import jax

    F = flags.FLAGS
    if F.coordinator is None and not F.distributed:
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if F.coordinator is not None:
        jax.distributed.initialize(F.coordinator, num_processes=F.num_processes, process_id=F.process_id)
    else:
        jax.distributed.initialize()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Orbax reports read-only managers (load_run) through absl at WARNING level: not a problem
    logging.getLogger("absl").setLevel(logging.ERROR)
