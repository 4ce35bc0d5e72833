"""The persistent XLA compilation cache jaxgen switches on, and compile-time bookkeeping.

A new process normally recompiles every jitted program (a pipeline's loop, a train step). With the
cache, XLA's executables are written to disk and a later process with the same program, shapes,
devices and jax/jaxlib version loads them instead of compiling.

``enable_compilation_cache()`` is called by the CLI (``train.common.run``: ``python -m train``,
``train.sample``, ``train.eval``, ``train.export``, ...) and by the Python API's entry points
(``jaxgen.load_run``, the Stable Diffusion pipelines, ``jaxgen.training.trainer.train``). It

* uses ``$JAXGEN_COMPILATION_CACHE_DIR``, else ``~/.cache/jaxgen/xla``;
* does nothing when ``$JAXGEN_COMPILATION_CACHE`` is ``0`` / ``off`` / ``false`` / ``no``;
* never overrides a cache directory set for JAX itself (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update("jax_compilation_cache_dir", ...)``): then that cache is used as it is
  configured, and nothing else is changed; nor does it turn on a cache switched off with
  ``jax_enable_compilation_cache=False``;
* writes programs that compile in 0.1 s or more (JAX's own default threshold is 1 s, which left a
  pipeline's text encoder out; a threshold set for JAX, ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
  or ``jax_persistent_cache_min_compile_time_secs``, is kept).

Several processes may share the directory. JAX 0.10 writes an entry in place (not through a
temporary file and a rename), so jaxgen also sets ``jax_compilation_cache_max_size`` (4 GiB,
unless set for JAX already) when the ``filelock`` package is installed: JAX then reads and writes
every entry under a file lock in the directory and evicts the least recently used entries beyond
the limit. Without ``filelock`` (and without a size limit) a read racing a write can find a
partial entry; entries are zlib streams with a checksum, so such a read fails to decompress and
JAX warns and compiles the program again: never a wrong executable. Only process 0 of a
multi-process run writes. The cache is trusted: do not point it at a directory others can write.
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import os
import threading

from jaxgen.errors import ConfigError

log = logging.getLogger("jaxgen")

ENV_SWITCH = "JAXGEN_COMPILATION_CACHE"
ENV_DIR = "JAXGEN_COMPILATION_CACHE_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "jaxgen", "xla")
MAX_SIZE_BYTES = 4 * 2**30
MIN_COMPILE_SECONDS = 0.1
_JAX_MIN_COMPILE_SECONDS = 1.0      # JAX's default of jax_persistent_cache_min_compile_time_secs
_OFF = ("0", "off", "false", "no")
_ON = ("", "1", "on", "true", "yes")

_lock = threading.Lock()
_enabled_dir: str | None = None      # the directory jaxgen set (None: not set by jaxgen)
_warned = False
_listening = False
_COMPILE_SECONDS: collections.Counter = collections.Counter()
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def cache_dir() -> str | None:
    """The directory jaxgen's cache uses (absolute), or None when ``$JAXGEN_COMPILATION_CACHE``
    switches it off. Reads the environment only (imports no jax)."""
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    if switch in _OFF:
        return None
    if switch not in _ON:
        raise ConfigError(f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r}: set it to 0 (or off) to disable "
                          f"jaxgen's compilation cache, or 1 (or leave it unset) to use it.")
    return os.path.abspath(os.path.expanduser(os.environ.get(ENV_DIR) or DEFAULT_DIR))


def enable_compilation_cache() -> str | None:
    """Switch on jaxgen's persistent compilation cache (see the module docstring); idempotent.

    Returns the directory of the persistent cache now in use (jaxgen's, or one the user set for
    JAX), or None when there is none. A directory that cannot be created is a logged warning, and
    the process runs without the cache. Also starts the bookkeeping of ``compile_seconds``.
    """
    global _enabled_dir, _warned
    import jax

    _listen()
    with _lock:
        if _enabled_dir is not None:
            return _enabled_dir
        path = cache_dir()                      # a bad switch value is an error even when unused
        own = jax.config.jax_compilation_cache_dir
        if own:
            return own
        if path is None or not jax.config.jax_enable_compilation_cache:
            return None
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            if not _warned:
                _warned = True
                log.warning("compilation cache off: cannot create %s (%s); set %s to a writable directory, "
                            "or %s=0 to silence this.", path, e.strerror or e, ENV_DIR, ENV_SWITCH)
            return None
        jax.config.update("jax_compilation_cache_dir", path)
        if ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ
                and jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_MIN_COMPILE_SECONDS):
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
        if (jax.config.jax_compilation_cache_max_size == -1 and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ
                and importlib.util.find_spec("filelock") is not None):
            jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
        _enabled_dir = path
        return path


def compile_seconds() -> dict[str, float]:
    """Seconds spent in XLA compilation (or loading from the persistent cache) per compiled program,
    keyed by the jitted function's name as JAX reports it (e.g. ``jit(_loop_stage)`` for a Stable
    Diffusion pipeline's denoising loop, ``jit(step)`` for a train step), summed over this process since the first
    ``enable_compilation_cache()`` call. Tracing and lowering to StableHLO are not included."""
    with _lock:
        return dict(_COMPILE_SECONDS)


def _listen() -> None:
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_on_duration)


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        with _lock:
            _COMPILE_SECONDS[str(kwargs.get("fun_name", "?"))] += float(duration)
