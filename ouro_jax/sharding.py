"""Device mesh, logical-axis rules and shardings (the only module that knows mesh axis names).

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters sharded),
`tensor` (Megatron-style model parallelism over heads / mlp / vocab). All axes are of type Auto, so
XLA's SPMD partitioner propagates shardings from the parameters, the batch and the activation
constraints. On several TPU slices (devices with distinct `slice_index`) the `data` axis spans the
slices (data-centre network) and the requested mesh is laid out inside each slice.

Logical axes: parameters carry names from `vocab, embed, heads, kv_heads, kv, mlp, layers`; activations
are constrained with `constrain(x, names)` using `batch` for rows (and the parameter names for feature
dimensions), so the partitioner keeps every activation split over the batch axes instead of choosing
to split the hidden dimension like the FSDP-sharded weights.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
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


def num_slices(devices: Sequence[jax.Device]) -> int:
    """Number of TPU slices (distinct `slice_index`) among `devices`; 1 for CPUs, GPUs, one slice."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(requested: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with Auto axes `MESH_AXES`.

    On S > 1 slices the requested shape is resolved against one slice's devices and `data` is
    multiplied by S across the slices, so only data-parallel gradient reduction crosses slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    auto = (AxisType.Auto,) * len(MESH_AXES)
    slices = num_slices(devices)
    if slices == 1:
        return jax.make_mesh(mesh_shape(requested, len(devices)), MESH_AXES, axis_types=auto, devices=devices)
    if len(devices) % slices:
        raise ValueError(f"mesh: {len(devices)} devices do not split evenly over {slices} slices")
    inside = mesh_shape(requested, len(devices) // slices)
    across = (slices,) + (1,) * (len(MESH_AXES) - 1)
    return Mesh(mesh_utils.create_hybrid_device_mesh(inside, across, devices), MESH_AXES, axis_types=auto)


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


def optimizer_state_shardings(opt_state, params, param_shardings):
    """Shardings of an optimiser state: every leaf that sits at a parameter's path (AdamW's mu and nu
    under `.../mu/layers/mlp/...`, also inside masked or multi-transform states) with that parameter's
    shape gets its sharding; everything else (step counts) is replicated. `params` and
    `param_shardings` are pure dicts of equal structure (arrays or ShapeDtypeStructs)."""
    by_path = {tuple(k.key for k in path): (x.shape, s) for (path, x), s in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings), strict=True)}
    replicated = NamedSharding(jax.tree.leaves(param_shardings)[0].mesh, PartitionSpec())

    def leaf_sharding(path, leaf):
        keys = []
        for k in reversed(path):  # the trailing dict keys are the parameter's path
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.append(k.key)
        shape, s = by_path.get(tuple(reversed(keys)), (None, replicated))
        return s if shape == leaf.shape else replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


def constrain(x: jax.Array, names: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
    """Constrain activation `x` to the sharding of its logical axis `names` (e.g. ("batch", None,
    None) for [B, S, D]) on the mesh made current by `using`; the identity outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh, rules))


def per_shard(fn: Callable, in_names: Sequence[Sequence[str | None]], out_like: int = 0) -> Callable:
    """`fn` run on each device's block of its array arguments (`jax.shard_map` over the current mesh),
    for kernels the partitioner cannot split (Pallas). Argument i is split by its logical axis names
    `in_names[i]`; the output is split like argument `out_like`. Outside a mesh, `fn` itself."""

    def wrapped(*args):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return fn(*args)
        specs = tuple(spec_for(names, x.shape, mesh) for names, x in zip(in_names, args, strict=True))
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[out_like], check_vma=False)(*args)

    return wrapped


@contextlib.contextmanager
def using(mesh: Mesh | None):
    """Make `mesh` current for `constrain` while tracing (usable inside `jax.jit`); None does nothing."""
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def traced_on(mesh: Mesh | None, fn: Callable) -> Callable:
    """`fn` traced with `mesh` current (see `using`): wrap a function before `jax.jit`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with using(mesh):
            return fn(*args, **kwargs)

    return wrapped


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """[B, S] batches: rows split over the batch mesh axes, sequence replicated."""
    target = dict(rules)["batch"]
    axes = tuple(a for a in ((target,) if isinstance(target, str) else target) if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None, None))


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble global arrays from this process's rows (each process holds its slice of rows)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
