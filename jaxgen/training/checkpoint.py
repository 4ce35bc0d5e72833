"""Orbax checkpoints: asynchronous, atomic, keep-last-N, the config saved beside the state.

A save is committed atomically (Orbax writes a ``*.orbax-checkpoint-tmp`` folder and renames it
when complete), so a process killed mid-save leaves the earlier steps intact and the half-written
folder is cleaned up on the next start. Restores go into an abstract target (ShapeDtypeStructs with
shardings for the current devices), so a checkpoint loads whatever device count wrote it.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgen.errors import CheckpointError
from jaxgen.training.state import TrainState, from_checkpoint_tree, to_checkpoint_tree


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


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager for {state, config} checkpoints in DIR/checkpoints."""

    def __init__(self, folder: str, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.folder = os.path.abspath(folder)
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

    def save(self, step: int, state: Any, config: dict) -> None:
        """Start an asynchronous save of ``state`` (a pytree of jax.Arrays; a TrainState is stored
        as ``to_checkpoint_tree(state)``) and the config dict."""
        if isinstance(state, TrainState):
            state = to_checkpoint_tree(state)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        config=ocp.args.JsonSave(config)))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, config dict, step) of ``step`` (default: the latest) into ``abstract_state``.

        abstract_state: ShapeDtypeStructs carrying the shardings wanted on this process's devices
        (a TrainState of them gives a TrainState back).
        """
        step = self._resolve(step)
        is_train_state = isinstance(abstract_state, TrainState)
        target = to_checkpoint_tree(abstract_state) if is_train_state else abstract_state
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(
                f"restoring step {step} from {self.folder} failed: {e}. The checkpoint does not fit "
                "this config's model (was the config changed?) or is damaged; use the config it was "
                "written with, another --step, or a new --workdir.") from e
        state = from_checkpoint_tree(dict(out["state"])) if is_train_state else out["state"]
        return state, dict(out["config"]), step

    def _resolve(self, step: int | None) -> int:
        """``step``, or the latest step when None; a CheckpointError if there is no such step."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.folder}.")
        if step is None:
            return max(steps)
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.folder}; it has steps "
                                  f"{sorted(steps)}.")
        return step

    def read_config(self, step: int | None = None) -> dict:
        """Only the config saved with ``step`` (default: latest)."""
        step = self._resolve(step)
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out["config"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) with the given shardings."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
