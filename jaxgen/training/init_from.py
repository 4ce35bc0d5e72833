"""Start a training run from pretrained weights: the ``config.init_from`` field.

The source is a diffusers/transformers folder (config.json + *.safetensors, read by
``jaxgen.load_pretrained``) or a finished jaxgen run directory (it has ``checkpoints/``; read by
``jaxgen.load_run``, so its EMA parameters when it keeps an EMA). Its parameters are merged into
a freshly initialised ``params`` tree on the host, strictly: every one of our parameters is copied,
expanded or named as new, every source parameter is used or named as dropped, and shapes match
unless ``expand`` names the parameter. Anything else is a ConfigError that lists the paths and
says which field to set.

Fields (paths are "/"-joined parameter paths, e.g. ``down_blocks_0/resnets_0/conv1/kernel``):
  source         "" (off), a pretrained folder or a jaxgen run directory
  stage          the stage of a multi-stage jaxgen run to take (e.g. "unet"); "" otherwise
  source_prefix  the subtree of the source's params to take ("" = all of them)
  target_prefix  where that subtree goes in our params ("" = the root)
  new            glob patterns of our params that keep their fresh initialisation
  drop           glob patterns of source params deliberately not used
  expand         glob patterns of our params whose source is smaller: copied into the leading
                 slice along each axis, the rest zero (e.g. conv_in [3,3,4,C] -> [3,3,8,C])
  zero           glob patterns of our params set to zero after the merge
A pattern matches a path by ``fnmatch`` (``*`` crosses "/") or names a whole subtree
(``vision_model`` matches ``vision_model/...``). A pattern that matches nothing is an error too.

In a multi-stage run each stage has its own ``config.stages.STAGE.init_from``; the top-level
field is then left off. The trainer applies it once, when a stage starts without a checkpoint,
to the parameters and the EMA (the optimizer state of AdamW is zeros whatever the parameters),
and writes the report to DIR/init_from.json (DIR/init_from_STAGE.json for a stage).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
from typing import Any, Callable

import ml_collections
import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.training.stages import MAIN_STAGE, checkpoint_dir, ema_decay_of, stage_config

DEFAULTS: dict[str, Any] = {"source": "", "stage": "", "source_prefix": "", "target_prefix": "",
                            "new": (), "drop": (), "expand": (), "zero": ()}
PATTERN_FIELDS = ("new", "drop", "expand", "zero")
SHOW = 10   # paths named in an error or a summary line, then a count of the rest


def default_config() -> ml_collections.ConfigDict:
    """``init_from`` switched off (what configs/common.py base_config() holds)."""
    return ml_collections.ConfigDict(dict(DEFAULTS))


def _listing(paths, show: int = SHOW) -> str:
    paths = list(paths)
    more = f" (+{len(paths) - show} more)" if len(paths) > show else ""
    return ", ".join(paths[:show]) + more


def _clean_prefix(prefix: str, where: str) -> str:
    prefix = prefix.strip("/")
    if prefix and any(not seg for seg in prefix.split("/")):
        raise ConfigError(f"{where}={prefix!r}: a '/'-joined path has no empty segments.")
    return prefix


def _as_dict(init_cfg) -> dict:
    return init_cfg.to_dict() if isinstance(init_cfg, ml_collections.ConfigDict) else dict(init_cfg or {})


def resolve(init_cfg, where: str = "config.init_from") -> dict[str, Any]:
    """The init_from fields as a plain dict over DEFAULTS: strings stripped, patterns as tuples of
    str. ConfigError on an unknown field or a wrong type; no file is read."""
    raw = _as_dict(init_cfg)
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{where} has no field(s) {', '.join(unknown)}; its fields are {', '.join(DEFAULTS)}.")
    out = {**DEFAULTS, **raw}
    for f in ("source", "stage", "source_prefix", "target_prefix"):
        if not isinstance(out[f], str):
            raise ConfigError(f"{where}.{f}={out[f]!r} must be a string.")
    for f in PATTERN_FIELDS:
        pats = out[f]
        pats = (pats,) if isinstance(pats, str) else tuple(pats or ())
        if not all(isinstance(p, str) and p for p in pats):
            raise ConfigError(f"{where}.{f}={out[f]!r} must be a tuple of non-empty glob patterns.")
        out[f] = tuple(p.strip("/") for p in pats)
    out["source"] = os.path.expanduser(out["source"].strip())
    out["source_prefix"] = _clean_prefix(out["source_prefix"], f"{where}.source_prefix")
    out["target_prefix"] = _clean_prefix(out["target_prefix"], f"{where}.target_prefix")
    return out


# -- sources ------------------------------------------------------------------------------------
def _has_steps(folder: str) -> bool:
    return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))


def _run_stages(source: str) -> tuple[str, ...]:
    """() for a single-stage run directory, else the stages that have checkpoints."""
    base = os.path.join(source, "checkpoints")
    if _has_steps(base):
        return ()
    return tuple(sorted(d for d in os.listdir(base) if _has_steps(os.path.join(base, d))))


def source_kind(source: str, where: str = "config.init_from.source") -> str:
    """"run" (a jaxgen run directory: it has checkpoints/) or "pretrained" (config.json and
    *.safetensors); a one-line ConfigError saying what was found otherwise."""
    if not os.path.isdir(source):
        raise ConfigError(f"{where}={source!r}: no such folder; give a diffusers/transformers folder "
                          "(config.json + *.safetensors) or a jaxgen run directory (it has checkpoints/).")
    if os.path.isdir(os.path.join(source, "checkpoints")):
        return "run"
    has_config = os.path.isfile(os.path.join(source, "config.json"))
    weights = (glob.glob(os.path.join(source, "*.safetensors"))
               + glob.glob(os.path.join(source, "*.safetensors.index.json")))
    if has_config and weights:
        return "pretrained"
    if os.path.isfile(os.path.join(source, "model_index.json")):
        raise ConfigError(f"{where}={source!r} is a pipeline folder (model_index.json): point it at one "
                          f"model's subfolder, e.g. {source}/unet or {source}/text_encoder.")
    found = "config.json but no *.safetensors" if has_config else (
        "*.safetensors but no config.json" if weights else "neither config.json nor *.safetensors")
    raise ConfigError(f"{where}={source!r} is neither a jaxgen run directory (no checkpoints/) nor a "
                      f"diffusers/transformers folder ({found}; pickle .bin/.ckpt weights are not read).")


def check_source(cfg: dict, where: str = "config.init_from") -> str:
    """Cheap checks of a resolved config's source on disk (no weights read): its kind, and that
    ``stage`` fits it. Returns the kind."""
    kind = source_kind(cfg["source"], f"{where}.source")
    if kind == "pretrained":
        if cfg["stage"]:
            raise ConfigError(f"{where}.stage={cfg['stage']!r}, but {cfg['source']} is a pretrained folder, "
                              "not a multi-stage jaxgen run: clear the stage.")
        return kind
    stages = _run_stages(cfg["source"])
    if not stages and not _has_steps(os.path.join(cfg["source"], "checkpoints")):
        raise ConfigError(f"{where}.source={cfg['source']!r} is a jaxgen run directory without a checkpoint "
                          "yet: train it first.")
    if stages and cfg["stage"] not in stages:
        raise ConfigError(f"{where}.stage={cfg['stage']!r}: {cfg['source']} is a multi-stage run; set "
                          f"{where}.stage to one of {', '.join(stages)}.")
    if not stages and cfg["stage"]:
        raise ConfigError(f"{where}.stage={cfg['stage']!r}, but {cfg['source']} is a single-stage run: "
                          "clear the stage.")
    return kind


def check_config(init_cfg, where: str = "config.init_from", check_files: bool = True) -> dict:
    """Validate one init_from entry; with ``check_files``, its source on disk too. Returns it resolved."""
    cfg = resolve(init_cfg, where)
    if not cfg["source"]:
        set_fields = [f for f in DEFAULTS if f != "source" and cfg[f] != DEFAULTS[f]]
        if set_fields:
            raise ConfigError(f"{where} sets {', '.join(set_fields)} but no source: set {where}.source, or "
                              "clear those fields.")
        return cfg
    if check_files:
        check_source(cfg, where)
    return cfg


def validate(config, workdir: str | None = None) -> None:
    """The init_from entries of a run config (top level, and each stage's for multi-stage
    configs). Sources are checked on disk, except for a stage of ``workdir`` that already has a
    checkpoint (a resume does not read the source again)."""
    def resumed(stage: str) -> bool:
        return workdir is not None and _has_steps(checkpoint_dir(os.path.abspath(workdir), stage))

    top = config.get("init_from", None)
    if "stages" not in config:
        if top is not None:
            stage = config.get("stage", MAIN_STAGE)
            where = "config.init_from" if stage == MAIN_STAGE else f"config.stages.{stage}.init_from"
            check_config(top, where, check_files=not resumed(stage))
        return
    if top is not None and resolve(top)["source"]:
        raise ConfigError(f"config.init_from.source is set, but this run trains stages "
                          f"{', '.join(config.stages)}: set config.stages.STAGE.init_from for the stage "
                          "to initialise instead.")
    for stage, entry in config.stages.items():
        if "init_from" in entry:   # overlaid field by field on the top level's, as stage_config does
            merged = {**_as_dict(top), **_as_dict(entry.init_from)}
            check_config(merged, f"config.stages.{stage}.init_from", check_files=not resumed(stage))


def strip_defaults(config: dict) -> dict:
    """A config dict without init_from entries that are switched off (top level and per stage), so
    a run saved before the field existed compares equal to the same config now."""
    def clean(d: dict) -> dict:
        d = dict(d)
        entry = d.get("init_from")
        if isinstance(entry, dict) and not entry.get("source"):
            del d["init_from"]
        return d

    out = clean(config)
    if isinstance(out.get("stages"), dict):
        out["stages"] = {k: clean(v) if isinstance(v, dict) else v for k, v in out["stages"].items()}
    return out


def load_source(init_cfg, where: str = "config.init_from") -> tuple[dict, str, list[str]]:
    """(params as host NumPy arrays, a description of the source, notes) of a resolved or raw
    init_from config."""
    import jax

    cfg = resolve(init_cfg, where)
    if not cfg["source"]:
        raise ConfigError(f"{where}.source is empty: nothing to load.")
    source = os.path.abspath(cfg["source"])
    notes: list[str] = []
    if check_source(cfg, where) == "pretrained":
        from jaxgen.convert.pretrained import load_pretrained

        module, params = load_pretrained(source, dtype=None)
        return jax.tree_util.tree_map(np.asarray, params), f"{type(module).__name__} folder {source}", notes
    from jaxgen.training.run import load_run

    run = load_run(source)
    stage = cfg["stage"]
    params, model_state, sconf = run.params, run.model_state, run.config
    if stage:
        params, model_state, sconf = params[stage], model_state[stage], stage_config(run.config, stage)
    kind = "EMA" if ema_decay_of(sconf) is not None else "raw (the run keeps no EMA)"
    desc = f"jaxgen run {source}" + (f" stage {stage!r}" if stage else "") + f" at step {run.step}, {kind} params"
    if model_state is not None:
        notes.append(f"the source's model state ({', '.join(model_state)}) is not copied: ours starts fresh")
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params), desc, notes


# -- the merge ------------------------------------------------------------------------------------
def _flat(tree) -> dict[str, Any]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf for path, leaf in leaves}


def _matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*")


def _any(path: str, patterns) -> bool:
    return any(_matches(path, p) for p in patterns)


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


@dataclasses.dataclass
class InitReport:
    """What ``apply_init_from`` did: our paths copied, expanded, left new and zeroed; the source
    paths dropped; ``sizes`` the scalar count of each group."""

    source: str
    copied: list[str]
    expanded: list[str]
    new: list[str]
    zeroed: list[str]
    dropped: list[str]
    sizes: dict[str, int]
    notes: list[str] = dataclasses.field(default_factory=list)

    GROUPS = ("copied", "expanded", "new", "zeroed", "dropped")

    def summary(self) -> str:
        lines = [f"init_from {self.source}"]
        for g in self.GROUPS:
            paths = getattr(self, g)
            what = " (source)" if g == "dropped" else ""
            line = f"  {g}{what}: {len(paths)} arrays, {self.sizes[g]:,} values"
            lines.append(line + (f": {_listing(paths, 5)}" if paths else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = {"source": self.source, "counts": {g: len(getattr(self, g)) for g in self.GROUPS},
             "sizes": dict(self.sizes), "notes": list(self.notes)}
        d.update({g: list(getattr(self, g)) for g in self.GROUPS})
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def merge_params(source_params, fresh_params, init_cfg, description: str = "the source",
                 where: str = "config.init_from") -> tuple[Any, InitReport]:
    """Merge ``source_params`` into ``fresh_params`` by the init_from rules (see the module doc).

    source_params: a params tree (host or device arrays); fresh_params: our freshly initialised
    params (arrays, or anything with .shape and .dtype). Returns (params, report): the same tree
    structure as fresh_params, with NumPy leaves of our dtypes for every copied, expanded or zeroed
    parameter and the fresh leaf itself (untouched, never fetched) for every new one.
    """
    import jax

    cfg = resolve(init_cfg, where)
    src, ours = _flat(source_params), _flat(fresh_params)
    sp, tp = cfg["source_prefix"], cfg["target_prefix"]
    problems: list[str] = []

    for field, space, name in (("new", ours, "our params"), ("expand", ours, "our params"),
                               ("zero", ours, "our params"), ("drop", src, "the source's params")):
        dead = [p for p in cfg[field] if not any(_matches(path, p) for path in space)]
        if dead:
            tops = sorted({path.split("/")[0] for path in space})
            problems.append(f"{where}.{field} pattern(s) {', '.join(map(repr, dead))} match none of {name} "
                            f"(top level: {_listing(tops)})")
    if sp and not any(s == sp or s.startswith(sp + "/") for s in src):
        tops = sorted({s.split("/")[0] for s in src})
        problems.append(f"{where}.source_prefix={sp!r} names no source params (its top level: {_listing(tops)})")
    if tp and not any(t == tp or t.startswith(tp + "/") for t in ours):
        tops = sorted({t.split("/")[0] for t in ours})
        problems.append(f"{where}.target_prefix={tp!r} names none of our params (our top level: {_listing(tops)})")
    if problems:
        raise ConfigError(f"{where} (from {description}): " + "; ".join(problems) + ".")

    pairs: dict[str, str] = {}      # our path -> source path
    dropped, unused = [], []
    for s in sorted(src):
        if _any(s, cfg["drop"]):
            dropped.append(s)
            continue
        if sp and not (s == sp or s.startswith(sp + "/")):
            unused.append(s)
            continue
        rel = s[len(sp):].lstrip("/") if sp else s
        t = "/".join(p for p in (tp, rel) if p)
        if t in ours and not _any(t, cfg["new"]):
            pairs[t] = s
        else:
            unused.append(s)

    out, copied, expanded, new, zeroed, missing, bad_shape, bad_expand = {}, [], [], [], [], [], [], []
    for t in sorted(ours):
        leaf = ours[t]
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if _any(t, cfg["new"]):
            new.append(t)
            out[t] = leaf
        elif t in pairs:
            value = np.asarray(jax.device_get(src[pairs[t]]))
            if tuple(value.shape) == shape:
                copied.append(t)
                out[t] = value.astype(dtype)
            elif not _any(t, cfg["expand"]):
                bad_shape.append(f"{t} {shape} <- {pairs[t]} {tuple(value.shape)}")
            elif value.ndim != len(shape) or any(a > b for a, b in zip(value.shape, shape)):
                bad_expand.append(f"{t} {shape} <- {pairs[t]} {tuple(value.shape)}")
            else:
                expanded.append(t)
                full = np.zeros(shape, dtype)
                full[tuple(slice(0, n) for n in value.shape)] = value
                out[t] = full
        else:
            missing.append(t)
    if unused:
        problems.append(f"{len(unused)} source param(s) not used: {_listing(unused)} (set {where}.drop to "
                        "patterns for them, or fix source_prefix/target_prefix)")
    if missing:
        problems.append(f"{len(missing)} of our param(s) get no value: {_listing(missing)} (set {where}.new "
                        "to patterns for them, or fix source_prefix/target_prefix)")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es): {_listing(bad_shape)} (set {where}.expand to "
                        "copy a smaller source into the leading slice, or fix the model config)")
    if bad_expand:
        problems.append(f"{len(bad_expand)} param(s) in {where}.expand whose source is not smaller along "
                        f"every axis of the same rank: {_listing(bad_expand)}")
    if problems:
        raise ConfigError(f"{where} (from {description}): " + "; ".join(problems) + ".")
    for t in sorted(ours):
        if _any(t, cfg["zero"]):
            zeroed.append(t)
            out[t] = np.zeros(tuple(ours[t].shape), np.dtype(ours[t].dtype))

    sizes = {g: sum(_size(ours[p].shape) for p in paths)
             for g, paths in (("copied", copied), ("expanded", expanded), ("new", new), ("zeroed", zeroed))}
    sizes["dropped"] = sum(_size(np.shape(src[p])) for p in dropped)
    report = InitReport(description, copied, expanded, new, zeroed, dropped, sizes)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh_params)
    merged = [out["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] for path, _ in leaves]
    return jax.tree_util.tree_unflatten(treedef, merged), report


def apply_init_from(init_cfg, fresh_params, log_to: Callable[[str], Any] | None = None,
                    where: str = "config.init_from") -> tuple[Any, InitReport]:
    """Load ``init_cfg.source`` and merge it into ``fresh_params`` (host-side, NumPy).

    Returns (params, report) as ``merge_params``; ``log_to`` (e.g. ``logging.info`` or ``print``)
    receives ``report.summary()``.
    """
    source_params, description, notes = load_source(init_cfg, where)
    params, report = merge_params(source_params, fresh_params, init_cfg, description, where)
    report.notes += notes
    if log_to is not None:
        log_to(report.summary())
    return params, report


def report_path(workdir: str, stage: str) -> str:
    """DIR/init_from.json for a single-stage run, DIR/init_from_STAGE.json for a stage."""
    return os.path.join(workdir, "init_from.json" if stage == MAIN_STAGE else f"init_from_{stage}.json")


def init_state(state, init_cfg, shardings, workdir: str | None = None, stage: str = "main",
               write: bool = True, log_to: Callable[[str], Any] | None = None):
    """The step-0 TrainState ``state`` with its params (and EMA, when it keeps one) replaced by the
    init_from merge, placed with ``shardings`` (the state's NamedShardings); new params keep their
    fresh (already placed) values. The optimizer state is kept: AdamW's moments are zeros and its
    count 0 whatever the parameters. With ``write`` (process 0) the report goes to
    ``report_path(workdir, stage)``."""
    import jax

    where = "config.init_from" if stage == "main" else f"config.stages.{stage}.init_from"
    merged, report = apply_init_from(init_cfg, state.params, log_to=log_to, where=where)

    def place(tree, fresh, sharding):
        def one(m, f, s):
            if not isinstance(m, np.ndarray):
                return f      # a new param: the fresh, already sharded array
            return jax.make_array_from_callback(m.shape, s, lambda idx: np.asarray(m[idx]))
        return jax.tree_util.tree_map(one, tree, fresh, sharding)

    params = place(merged, state.params, shardings.params)
    ema = None if state.ema_params is None else place(merged, state.ema_params, shardings.ema_params)
    if write and workdir is not None:
        with open(report_path(workdir, stage), "w", encoding="utf-8") as f:
            json.dump({"init_from": resolve(init_cfg, where), **report.to_dict()}, f, indent=2)
    return state.replace(params=params, ema_params=ema), report
