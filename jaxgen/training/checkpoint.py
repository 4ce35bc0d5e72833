"""Orbax checkpoints: asynchronous, atomic, keep-last-N, the config saved beside the state, and
every step checked before it is trusted.

A save is committed atomically (Orbax writes a ``*.orbax-checkpoint-tmp`` folder and renames it
when complete), so a process killed mid-save leaves the earlier steps intact and the half-written
folder is cleaned up on the next start. Restores go into an abstract target (ShapeDtypeStructs with
shardings for the current devices), so a checkpoint loads whatever device count wrote it.

Damaged steps. Once a save has committed, process 0 writes ``STEP/jaxgen_files.json``: the size
and CRC-32 of every file of the step. A restore first checks the step against it (and, for steps
without one, that the files every step has are there), so a deleted, truncated or overwritten file
is named before Orbax reads anything; whatever Orbax or TensorStore raise while reading is turned
into the same kind of report. The policy (``Checkpointer.restore``):

* no step asked for (resume, ``load_run(DIR)``): the newest intact step is restored; each newer,
  damaged one is reported in a warning naming the step and the file. A trainer (not read-only)
  then renames the damaged step folder to ``STEP.damaged`` (nothing is deleted) so training
  continues from the intact step and writes that step anew;
* a step asked for (``--step N``, ``load_run(DIR, step=N)``): a damaged step is a CheckpointError
  naming the step, the file, and the other steps to pass instead;
* no intact step at all: a CheckpointError listing every step and what is wrong with it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.training.state import TrainState, from_checkpoint_tree, to_checkpoint_tree

log = logging.getLogger("jaxgen")

MANIFEST = "jaxgen_files.json"
# Files every step Orbax writes for the {state, config} items has, whether or not it has a manifest.
REQUIRED_FILES = ("state/_METADATA", "config/metadata")


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed and prove we can write there; a CheckpointError otherwise."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write to the work directory {folder!r} ({e.strerror}): "
                              "choose a --workdir you can write to.") from e


def max_to_keep(keep_checkpoints) -> int | None:
    """Orbax's max_to_keep from a config's ``keep_checkpoints``: N >= 1 keeps the newest N, 0 keeps
    every step (None); anything else is a ConfigError."""
    if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 0:
        raise ConfigError(f"config.keep_checkpoints={keep_checkpoints!r}: give the number of newest "
                          "checkpoints to keep (>= 1), or 0 to keep every one.")
    return None if keep_checkpoints == 0 else keep_checkpoints


# -- the per-step file manifest ------------------------------------------------------------------
def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _step_files(step_dir: str) -> list[str]:
    """Paths (relative, "/"-separated) of every file under ``step_dir`` except the manifest."""
    out = []
    for root, _, names in os.walk(step_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), step_dir).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str) -> None:
    """Record size and CRC-32 of every file of a committed step in STEP/jaxgen_files.json
    (written to a temporary name and renamed, so a manifest is whole or absent)."""
    table = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _crc32(os.path.join(step_dir, rel))]
             for rel in _step_files(step_dir)}
    tmp = os.path.join(step_dir, f".{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": table}, f)
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_step(step_dir: str) -> str | None:
    """What is wrong with the files of a step folder ("state/_METADATA is missing", "... is
    truncated (...)", "... has changed since it was saved (checksum)"), or None when they are as
    saved. Steps without a manifest (written before it existed, or killed between the commit and
    the manifest) are only checked for REQUIRED_FILES."""
    if not os.path.isdir(step_dir):
        return "the step folder is missing"
    for rel in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(step_dir, rel)):
            return f"{rel} is missing"
    try:
        with open(os.path.join(step_dir, MANIFEST)) as f:
            table = json.load(f)["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} (the list of the step's files) is unreadable"
    for rel, (size, crc) in sorted(table.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        got = os.path.getsize(path)
        if got != size:
            return f"{rel} is {'truncated' if got < size else 'longer than saved'} ({got} of {size} bytes)"
        if _crc32(path) != crc:
            return f"{rel} has changed since it was saved (its checksum differs)"
    return None


def _reason(e: BaseException, step_dir: str) -> str:
    """One line on what a failed read of ``step_dir`` ran into: the file, or else the array, that
    the error (or the error it was raised from) names."""
    text = " ".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
    named = [m.strip("/") for m in re.findall(re.escape(step_dir.rstrip("/")) + r"/([^\s\"',:\]\\]+)", text)]
    deepest = max(named, key=len, default="")
    if "/" in deepest:                                   # a file inside an item: name it
        return f"reading {deepest} failed ({type(e).__name__})"
    m = re.search(r"'path': '([^'/][^']*)'", text) or re.search(r'Error reading "([^"/]+)/', text)
    if m:                                                # TensorStore names the array it read
        return f"reading array {m.group(1).strip('/')} of {deepest or 'state'} failed ({type(e).__name__})"
    if deepest:
        return f"reading {deepest} failed ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160] or 'no message'}"


class _Damaged(Exception):
    """A step whose files are not as saved; ``reason`` says which file (internal)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"step {step}: {reason}")
        self.step, self.reason = step, reason


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager for {state, config} checkpoints in DIR/checkpoints.

    max_to_keep: the newest N steps are kept; None keeps all. ``damaged``: after a restore, the
    (step, reason) pairs of newer steps that were skipped as damaged.
    """

    def __init__(self, folder: str, *, max_to_keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        self.folder = os.path.abspath(folder)
        self.read_only = read_only
        self.damaged: list[tuple[int, str]] = []
        self._unsealed: list[int] = []
        if read_only and not os.path.isdir(self.folder):
            raise CheckpointError(f"no checkpoints in {self.folder}: train first "
                                  "(python -m train --config ... --workdir ...).")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.folder, options=options, item_names=("state", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.folder, str(step))

    def save(self, step: int, state: Any, config: dict) -> None:
        """Start an asynchronous save of ``state`` (a pytree of jax.Arrays; a TrainState is stored
        as ``to_checkpoint_tree(state)``) and the config dict. The previous save is finished (and
        its manifest written) first."""
        if isinstance(state, TrainState):
            state = to_checkpoint_tree(state)
        self._seal()
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        config=ocp.args.JsonSave(config)))
        self._unsealed.append(step)

    def _seal(self) -> None:
        """Wait for pending saves, then write the manifest of each step this Checkpointer saved
        (process 0; steps Orbax already deleted are skipped)."""
        self.manager.wait_until_finished()
        pending, self._unsealed = self._unsealed, []
        if jax.process_index() != 0:
            return
        for step in pending:
            if os.path.isdir(self.step_dir(step)):
                write_manifest(self.step_dir(step))

    def restore(self, abstract_state: Any, step: int | None = None,
                check_config: Callable[[dict], None] | None = None) -> tuple[Any, dict, int]:
        """(state, config dict, step) of ``step`` (default: the newest intact step) into
        ``abstract_state``, by the damaged-step policy of the module docstring.

        abstract_state: ShapeDtypeStructs carrying the shardings wanted on this process's devices
        (a TrainState of them gives a TrainState back). check_config(saved_config) runs before
        the state is read (a resume compares configs there, so a changed model is reported as the
        changed config field, not as a shape error); its errors pass through.
        """
        is_train_state = isinstance(abstract_state, TrainState)
        target = to_checkpoint_tree(abstract_state) if is_train_state else abstract_state
        candidates = [self._resolve(step)] if step is not None else self._candidates()
        self.damaged = []
        for s in candidates:
            try:
                config = self._read_config(s)
                if check_config is not None:
                    check_config(config)
                state = self._read_state(s, target)
            except _Damaged as d:
                if step is not None:
                    raise CheckpointError(f"checkpoint step {s} in {self.folder} is damaged: {d.reason}. "
                                          f"{self._others_hint(s)}") from d
                log.warning("checkpoint step %d in %s is damaged (%s); trying the step before it",
                            s, self.folder, d.reason)
                self.damaged.append((s, d.reason))
                continue
            if self.damaged:
                self._set_aside([d for d, _ in self.damaged], "damaged")
            state = from_checkpoint_tree(dict(state)) if is_train_state else state
            return state, config, s
        raise self._none_intact()

    def read_config(self, step: int | None = None) -> tuple[dict, int]:
        """(the config saved with ``step``, step): default the newest step whose config reads
        (damaged ones are skipped with a warning, as in ``restore``)."""
        if step is not None:
            s = self._resolve(step)
            try:
                return self._read_config(s), s
            except _Damaged as d:
                raise CheckpointError(f"checkpoint step {s} in {self.folder} is damaged: {d.reason}. "
                                      f"{self._others_hint(s)}") from d
        self.damaged = []
        for s in self._candidates():
            try:
                return self._read_config(s), s
            except _Damaged as d:
                log.warning("checkpoint step %d in %s is damaged (%s); trying the step before it",
                            s, self.folder, d.reason)
                self.damaged.append((s, d.reason))
        raise self._none_intact()

    def set_aside(self, steps: list[int], why: str) -> list[str]:
        """Rename the folders of ``steps`` to STEP.<why> (STEP.<why>.2, ... if taken): Orbax no
        longer sees them, nothing is deleted. Process 0 renames; returns the new paths."""
        return self._set_aside(steps, why)

    # -- internals ---------------------------------------------------------------------------
    def _candidates(self) -> list[int]:
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.folder}.")
        return steps

    def _resolve(self, step: int) -> int:
        """``step`` itself, or a CheckpointError if there is no such step."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.folder}.")
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.folder}; it has steps "
                                  f"{sorted(steps)} (pass one of them as --step).")
        return step

    def _others_hint(self, step: int) -> str:
        others = sorted((s for s in self.all_steps() if s != step), reverse=True)
        if not others:
            return "It is the only checkpoint: train anew in a new --workdir."
        return (f"Pass --step {others[0]} (the other steps: {', '.join(map(str, others))}), or omit "
                "--step to use the newest intact one.")

    def _none_intact(self) -> CheckpointError:
        listed = "; ".join(f"step {s}: {r}" for s, r in self.damaged)
        return CheckpointError(f"no checkpoint in {self.folder} can be restored ({listed}). If the files "
                               "are intact, the run was written by another version of its config or of "
                               "jaxgen; otherwise start again in a new --workdir.")

    def _read_config(self, step: int) -> dict:
        step_dir = self.step_dir(step)
        problem = verify_step(step_dir)
        if problem:
            raise _Damaged(step, problem)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
            return dict(out["config"])
        except Exception as e:   # whatever Orbax raises for unreadable JSON: a damaged step
            raise _Damaged(step, _reason(e, step_dir)) from e

    def _read_state(self, step: int, target: Any) -> Any:
        step_dir = self.step_dir(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
            return out["state"]
        except Exception as e:   # TensorStore raises a bare Exception for unreadable chunks
            raise _Damaged(step, _reason(e, step_dir)) from e

    def _set_aside(self, steps: list[int], why: str) -> list[str]:
        if self.read_only:
            return []
        moved = []
        if jax.process_index() == 0:
            for s in steps:
                src = self.step_dir(s)
                if not os.path.isdir(src):
                    continue
                dst, n = f"{src}.{why}", 1
                while os.path.exists(dst):
                    n += 1
                    dst = f"{src}.{why}.{n}"
                os.rename(src, dst)
                moved.append(dst)
                log.warning("moved checkpoint step %d aside to %s (nothing was deleted)", s, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxgen set aside {why} {steps}")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        self._seal()

    def close(self) -> None:
        self._seal()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) with the given shardings."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
