"""Reading and writing PyTorch-side config.json files (diffusers / transformers).

Reading is tolerant the way diffusers' ``from_config`` is: keys starting with ``_`` are metadata,
fields that belong to another class or a newer library version are ignored with a warning, and
only a known field set to a value jaxgen does not implement is an error that names it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Mapping

from jaxgen.errors import ConfigError


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object from ``path``; a missing or corrupt file is a ConfigError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file. Point at a folder written by save_pretrained "
                          "(it holds config.json next to the weights).")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated: "
                          "re-export it.") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(value).__name__}.")
    return value


def freeze(value: Any) -> Any:
    """JSON lists become tuples so that values can sit in (hashable) Flax module fields."""
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: freeze(v) for k, v in value.items()}
    return value


# -- predicates for filter_config's ``supported`` tables -------------------------------------------
def is_int(value: Any) -> bool:
    """A JSON integer: an int that is not a bool (True is an int in Python, not in a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def all_in(allowed: tuple) -> Callable[[Any], bool]:
    """A predicate: the value is a non-empty tuple or list whose every item is in ``allowed``."""
    return lambda value: isinstance(value, (tuple, list)) and len(value) > 0 and all(v in allowed for v in value)


def module_fields(cls) -> dict[str, Any]:
    """Config fields of a dataclass (Flax module) -> default (dataclasses.MISSING if none)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in ("parent", "name") or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = dataclasses.MISSING
    return out


def filter_config(
    cfg: Mapping[str, Any],
    fields: Mapping[str, Any],
    *,
    owner: str,
    supported: Mapping[str, Callable[[Any], bool] | tuple] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Keep the fields of ``cfg`` that ``owner`` knows, as keyword arguments.

    cfg:       a PyTorch-side config dict (config.json / scheduler_config.json).
    fields:    the names ``owner`` accepts -> default (dataclasses.MISSING = required).
    supported: field -> tuple of implemented values, or a predicate; a known field with any other
               value is a ConfigError naming it. (None values are always accepted for
               fields whose default is None.)
    aliases:   PyTorch-side name -> jaxgen field name, for fields that were renamed upstream.
    Unknown fields (another class's, a newer version's) are ignored with one warning.
    """
    supported = dict(supported or {})
    aliases = dict(aliases or {})
    out: dict[str, Any] = {}
    ignored = []
    for key, value in cfg.items():
        if key.startswith("_"):
            continue  # metadata: _class_name, _diffusers_version, _use_default_values, ...
        key = aliases.get(key, key)
        if key not in fields:
            ignored.append(key)
            continue
        value = freeze(value)
        check = supported.get(key)
        if check is not None and not (value is None and fields[key] is None):
            ok = check(value) if callable(check) else value in check
            if not ok:
                allowed = "" if callable(check) else f" (implemented: {', '.join(map(repr, check))})"
                raise ConfigError(f"{owner}: {key}={value!r} is not implemented by jaxgen{allowed}.")
        out[key] = value
    if ignored:
        warnings.warn(f"{owner}: ignoring config fields it does not use: {', '.join(sorted(ignored))}",
                      stacklevel=2)
    missing = [k for k, d in fields.items() if d is dataclasses.MISSING and k not in out]
    if missing:
        raise ConfigError(f"{owner}: config lacks required field(s) {', '.join(missing)}.")
    return out


def to_json_value(value: Any) -> Any:
    """Tuples -> lists, recursively, for json.dump."""
    if isinstance(value, (tuple, list)):
        return [to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json_value(v) for k, v in value.items()}
    return value


def write_json(path: str | os.PathLike, value: Mapping[str, Any]) -> None:
    """Write ``value`` as indented, key-sorted JSON (the way diffusers writes configs)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_json_value(dict(value)), f, indent=2, sort_keys=True)
        f.write("\n")
