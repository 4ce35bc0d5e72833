"""Reading and writing PyTorch-side config.json files (diffusers / transformers).

Reading is tolerant the way diffusers' ``from_config`` is: keys starting with ``_`` are metadata,
fields that belong to another class or a newer library version are ignored with a warning, and
only a known field set to a value jaxgen does not implement (or of another type than the field's
annotation, ``check_types``) is an error that names it.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
import types
import typing
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
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e}); the file is corrupt or not a JSON config: "
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


def field_types(cls) -> dict[str, Any]:
    """Dataclass field -> its resolved annotation (typing.get_type_hints), cached per class."""
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return _FIELD_TYPES[cls]


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def matches_type(value: Any, hint: Any) -> bool:
    """Whether a config value fits a field annotation: int (not bool), float (int accepted),
    bool, str, None, unions, tuple[X, ...] / Sequence[X] (a tuple or list), Mapping; any other
    annotation (Any, dtypes, ...) is not checked."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(matches_type, value, args))
        return all(matches_type(v, args[0]) for v in value) if args else True
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return isinstance(value, collections.abc.Mapping)
    return True


def check_types(values: Mapping[str, Any], cls, *, owner: str) -> None:
    """A ConfigError naming the first field of ``values`` whose value does not fit the annotation
    of ``cls``'s field (``matches_type``); None is accepted where the default is None."""
    hints, defaults = field_types(cls), module_fields(cls)
    for key, value in values.items():
        if key not in hints or (value is None and defaults.get(key) is None):
            continue
        if not matches_type(value, hints[key]):
            want = str(hints[key]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ConfigError(f"{owner}: {key}={value!r} has the wrong type; it takes {want}.")


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
