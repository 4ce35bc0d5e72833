"""Reading and checking values of jaxgen's own configs (ml_collections ConfigDicts).

One home for what every task does with its config fields: turn ConfigDict / list values read
back from a checkpoint's JSON into plain Python (``plain``), and check a field against its
choices or its range with an error that names the field, the value and what to set
(``check_choice``, ``check_range``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from jaxgen.errors import ConfigError, DataError


def plain(value):
    """ConfigDict / list values (also as read back from a checkpoint's JSON) -> plain dicts and
    tuples, recursively; other values unchanged."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    return value


def check_count(name: str, value, error=DataError) -> int:
    """``value`` as an int >= 1 (a number of images, of sampling steps), or ``error`` naming the
    argument; bools and floats are refused (they fix array sizes)."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise error(f"{name}={value!r}: give a whole number >= 1.")
    return int(value)


def check_guidance(value, rule: str) -> float:
    """A classifier-free guidance scale as a float: NaN/Inf (or a non-number) is a ConfigError; a
    negative one is allowed (it pushes samples away from their condition) but warned about, with
    ``rule`` saying what this sampler does with it."""
    import warnings

    g = check_range("guidance_scale", value)
    if g != g or g in (float("inf"), float("-inf")):
        raise ConfigError(f"guidance_scale={value!r} must be a finite number.")
    if g < 0:
        warnings.warn(f"guidance_scale={g:g} is negative: {rule}", UserWarning, stacklevel=3)
    return g


def check_choice(field: str, value, choices: Iterable, hint: str = ""):
    """``value`` if it is one of ``choices``, else ConfigError "field=value: choose one of ..."."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{field}={value!r}: choose one of {', '.join(map(str, choices))}"
                          f"{' (' + hint + ')' if hint else ''}.")
    return value


def check_range(field: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                hint: str = "") -> float:
    """float(value) if it lies in the interval (closed unless *_open; None = unbounded), else
    ConfigError "field=value must be in [low, high) (hint)". NaN is always out of range."""
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{field}={value!r} must be a number.") from e
    ok = v == v                                              # NaN fails every comparison
    if low is not None:
        ok = ok and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{field}={value!r} must be in {interval}{' (' + hint + ')' if hint else ''}.")
    return v
