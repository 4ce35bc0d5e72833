"""Device meshes and sharding rules: a (data, fsdp) mesh with Auto axis types.

Batches are split over both axes; a parameter (and its optimizer state) is split over ``fsdp``
along its largest dimension that the fsdp size divides, when it is big enough to be worth it, and
is replicated otherwise. With fsdp = 1 everything is replicated (plain data parallelism).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgen.errors import ConfigError

BATCH_AXES = ("data", "fsdp")
MIN_FSDP_SIZE = 2 ** 10  # parameters with fewer elements stay replicated


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "fsdp") mesh over all (or the given) devices; data=-1 takes what fsdp leaves."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ConfigError(f"mesh.fsdp={fsdp} must be >= 1 and divide the device count {n}.")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but there are "
                          f"{n}: set mesh.data=-1 to use them all, or sizes that multiply to {n}.")
    auto = (jax.sharding.AxisType.Auto,) * 2
    if devices == list(jax.devices()):
        return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=auto)
    return jax.sharding.Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES, axis_types=auto)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """The fsdp rule for one array: split its largest fsdp-divisible dimension, if big enough."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs by the fsdp rule (scalars replicated)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, param_spec(tuple(getattr(x, "shape", ())), fsdp)), abstract_state)
