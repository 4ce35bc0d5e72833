"""What the CLI entry points share: the one error rule (``run``), logging set-up and
multi-process initialisation; ``run`` also switches on the persistent compilation cache
(jaxgen/compile_cache.py).

Every entry point ends with ``common.run(main)``. A user error becomes one line, ``error: ...``
on stderr, and exit status 2: a bad or missing flag, a misspelled ``--config.FIELD`` (with the
fields of its group and a "did you mean"), a config file that does not exist, ``app.UsageError``,
jaxgen's own errors (``JaxgenError``: bad config values, data, checkpoints, weights) and OS errors
on the user's paths. Anything else is a bug in jaxgen and keeps its traceback.
"""
from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
from typing import Callable, NoReturn

from absl import app, flags

flags.DEFINE_string("coordinator", None, "host:port of process 0 for a multi-process run "
                    "(jax.distributed.initialize); omit on one host.")
flags.DEFINE_integer("num_processes", None, "number of processes in a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with cluster "
                  "auto-detection (SLURM, Cloud TPU, ...)")

EXIT_USER_ERROR = 2
# Field names people type for jaxgen's own (checked by "did you mean" as well as close spellings).
_SYNONYMS = {"learning_rate": "lr", "steps": "total_steps", "num_steps": "total_steps",
             "max_steps": "total_steps", "bs": "batch_size", "keep": "keep_checkpoints"}


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """``app.run(main)`` with the error rule of this module (one ``error:`` line, exit 2).
    argv: the command line (default sys.argv)."""
    app.run(functools.partial(_guarded, main), argv=argv, flags_parser=parse_flags)


def fail(message: object) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with status 2."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"error: {text}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _guarded(main, argv):
    from jaxgen.compile_cache import enable_compilation_cache
    from jaxgen.errors import JaxgenError

    try:
        enable_compilation_cache()           # jaxgen/compile_cache.py: $JAXGEN_COMPILATION_CACHE(_DIR)
        return main(argv)
    except (JaxgenError, app.UsageError) as e:
        fail(e)
    except OSError as e:                     # the user's paths: --out in a read-only folder, ...
        if e.filename is None:
            raise
        fail(f"{e.filename}: {e.strerror or e}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every parse error as one ``error:`` line (exit 2)."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(_flag_error(str(e)))
    except (AttributeError, KeyError, OSError, TypeError) as e:
        # ml_collections raises these while applying --config.FIELD overrides
        fail(_config_error(argv, e))
    for name in flags.FLAGS:
        if type(flags.FLAGS[name].value).__name__ == "_ErrorConfig":   # ml_collections defers a failed load
            fail(_config_load_error(argv, name))
    return rest


def _flag_error(message: str) -> str:
    """absl's message, or for a config file that raised while loading: its first line and the
    exception that file raised (not the traceback)."""
    if "Traceback" not in message:
        return message
    head = message.splitlines()[0].rstrip(": ")
    last = [line.strip() for line in message.splitlines() if line.strip()][-1]
    return f"{head}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)}"


def _config_load_error(argv: list[str], name: str) -> str:
    spec = _config_spec(argv, name) or ""
    path = spec.split(":")[0]
    if not os.path.isfile(path):
        return (f"--{name}={spec}: no config file {path!r} (looked from {os.getcwd()}); give the path of "
                "a configs/NAME.py file, e.g. --config=configs/digits_ae.py:tiny")
    try:
        flags.FLAGS[name].value.seed   # re-raises the deferred error
    except OSError as e:
        return f"--{name}={spec}: {' '.join(str(e).split())}"
    return f"--{name}={spec}: the config file could not be loaded"


def _config_spec(argv: list[str], name: str) -> str | None:
    """PATH[:ARG] of --NAME=PATH[:ARG] (or --NAME PATH[:ARG]) in argv."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_error(argv: list[str], err: BaseException) -> str:
    """One line for an override --config.a.b=V that names no field: which group lacks which field,
    a close match, and the group's fields."""
    config_flags = [n for n in flags.FLAGS if _is_config_flag(n)]
    for name in config_flags:
        spec = _config_spec(argv, name)
        if spec is not None and not os.path.isfile(spec.split(":")[0]):
            return _config_load_error(argv, name)
    for arg in argv[1:]:
        m = re.match(r"--?(?:no)?(\w+)\.([\w.]+)(=.*)?$", arg)
        if not m or m.group(1) not in config_flags:
            continue
        name, path = m.group(1), m.group(2).split(".")
        config = _load_config(argv, name)
        if config is None:
            continue
        node, where = config, name
        for part in path:
            if not hasattr(node, "keys"):
                return (f"--{name}.{'.'.join(path)}: {where} is a {type(node).__name__} value, not a group "
                        f"of fields; set --{where}=VALUE.")
            if part not in node:
                fields = sorted(node.keys())
                close = difflib.get_close_matches(part, fields, n=1, cutoff=0.6)
                if not close:                          # learnig_rate ~ learning_rate -> lr
                    alias = difflib.get_close_matches(part, list(_SYNONYMS), n=1, cutoff=0.8)
                    close = [_SYNONYMS[alias[0]]] if alias and _SYNONYMS[alias[0]] in fields else []
                hint = f" Did you mean --{where}.{close[0]}?" if close else ""
                return (f"--{name}.{'.'.join(path)}: {where} has no field {part!r}.{hint} Its fields: "
                        f"{', '.join(fields)}.")
            node, where = node[part], f"{where}.{part}"
    text = " ".join(str(err).split())
    if isinstance(err, OSError):
        return f"the config could not be loaded: {text}"
    return f"bad --config override ({type(err).__name__}: {text})"


def _is_config_flag(name: str) -> bool:
    from ml_collections.config_flags import config_flags as cf

    return isinstance(flags.FLAGS[name].parser, cf.ConfigFileFlagParser)


def _load_config(argv: list[str], name: str):
    """The config file given as --NAME=PATH[:ARG] in argv, loaded without overrides (None if
    it cannot be)."""
    spec = _config_spec(argv, name)
    if spec is None or not os.path.isfile(spec.split(":")[0]):
        return None
    try:
        return flags.FLAGS[name].parser.parse(spec)
    except Exception:   # the file itself is broken: the caller reports the original error
        return None


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
