"""Device mesh, logical-axis rules and shardings (the only module that knows mesh axis names).

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters sharded),
`tensor` (Megatron-style model parallelism over heads / mlp / vocab). All axes are of type Auto, so
XLA's SPMD partitioner propagates shardings from the parameters and the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
)


def mesh_shape(requested: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve {"data": -1, "fsdp": 2, "tensor": 1} against the device count (one -1 fills).

    Raises ValueError (one line) when the shape cannot match the devices.
    """
    unknown = set(requested) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(requested.get(axis, 1)) for axis in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive with at most one -1, got {dict(requested)}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh: {dict(requested)} cannot fill {num_devices} devices "
                             f"({num_devices} is not a multiple of {known})")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} "
                         f"devices but {num_devices} are available")
    return tuple(sizes)


def make_mesh(requested: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with Auto axes `MESH_AXES`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(requested, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_axes(model: nnx.Module) -> dict:
    """Pure dict (same structure as the params) of each parameter's logical axis names."""
    return nnx.to_pure_dict(nnx.map_state(
        lambda _, var: var.get_metadata()["out_sharding"], nnx.state(model, nnx.Param)))


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules=DEFAULT_RULES) -> PartitionSpec:
    """Logical names -> PartitionSpec. A dimension that the mapped mesh axes do not divide, or a mesh
    axis already used by an earlier dimension, is left replicated."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(abstract_params, axes, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding for every parameter from its logical axes (pure dicts of equal structure)."""
    return jax.tree.map(
        lambda x, names: NamedSharding(mesh, spec_for(names, x.shape, mesh, rules)),
        abstract_params, axes, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """[B, S] batches: rows split over the batch mesh axes, sequence replicated."""
    target = dict(rules)["batch"]
    axes = tuple(a for a in ((target,) if isinstance(target, str) else target) if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None, None))


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble global arrays from this process's rows (each process holds its slice of rows)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` on multi-process launches (SLURM, TPU pods, or when the
    coordinator address is set); a no-op for a single process."""
    import os

    multi = any(k in os.environ for k in (
        "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    if multi and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
