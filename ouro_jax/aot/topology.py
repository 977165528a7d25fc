"""TPU slices named as Cloud users name them (`v5p-128`, `v5e-256`, ...) and their compile-only devices.

Cloud names count TensorCores for v4 and v5p (`v5p-128` = 64 chips, one JAX device per chip) and chips for
v5e and v6e (`v5e-256` = 256 chips). `devices` asks libtpu for a topology's devices without any TPU
attached, so XLA's TPU compiler can compile for it on a CPU host (`JAX_PLATFORMS=cpu`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from ouro_jax.cli import UserError

GiB = 2**30

# generation: (cores per chip in the Cloud name, mesh dimensions, HBM bytes per chip, peak dense bf16
# FLOP/s per chip, libtpu chip config, HBM bytes/s per chip). HBM is what the TPU compiler reports as
# available; peaks and bandwidths are Google Cloud's published per-chip figures.
_GENERATIONS = {
    "v4": (2, 3, 32 * GiB, 275e12, "megacore", 1228e9),
    "v5p": (2, 3, int(95.74 * GiB), 459e12, "default", 2765e9),
    "v5e": (1, 2, 16 * GiB, 197e12, "default", 819e9),
    "v6e": (1, 2, 32 * GiB, 918e12, "default", 1640e9),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
# libtpu's platform name of each generation in a topology string ("v5p:4x4x4")
_PLATFORM = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}
EXTRA_HINT = "pip install -e '.[aot]' (the libtpu wheel of jax's `tpu` extra; a TPU VM has it)"


@dataclasses.dataclass(frozen=True)
class Slice:
    """One TPU slice: name ("v5p-128"), generation ("v5p"), chips, topology ("v5p:4x4x4"), chips per host,
    HBM bytes per chip, peak bf16 FLOP/s per chip and HBM bytes/s per chip."""

    name: str
    generation: str
    chips: int
    topology: str
    chips_per_host: int
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host


def chip_grid(chips: int, ndim: int) -> tuple[int, ...]:
    """The physical chip grid of a slice: 3-D (v4, v5p) grows from 2x2x1, 2-D (v5e, v6e) from 1x1, by
    doubling the smallest dimension (the last of equal ones): 4 -> 2x2x1, 64 -> 4x4x4, 256 -> 16x16."""
    dims = [2, 2, 1] if ndim == 3 else [1, 1]
    start = math.prod(dims)
    if chips < start or chips & (chips - 1):
        raise UserError(f"{chips} chips: a {ndim}-D TPU slice has a power-of-two number of chips >= {start}")
    while math.prod(dims) < chips:
        smallest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == smallest)
        dims[i] *= 2
    return tuple(dims)


def parse(name: str) -> Slice:
    """"v5p-128" / "v5e-256" / "v5litepod-16" / "v4-8" / "v6e-64" -> Slice."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    generation = _ALIASES.get(match.group(1), match.group(1)) if match else None
    if generation not in _GENERATIONS:
        raise UserError(f"--topology={name!r}: expected a Cloud TPU name such as v4-64, v5p-128, v5e-256 or "
                        f"v6e-256 (generations {', '.join(_GENERATIONS)})")
    cores, ndim, hbm, peak, _, bandwidth = _GENERATIONS[generation]
    count = int(match.group(2))
    if count % cores:
        raise UserError(f"--topology={name!r}: {generation} names count TensorCores ({cores} per chip)")
    chips = count // cores
    grid = chip_grid(chips, ndim)
    per_host = chips if ndim == 2 and chips <= 8 else min(chips, 4)
    return Slice(name=f"{generation}-{count}", generation=generation, chips=chips,
                 topology=f"{_PLATFORM[generation]}:{'x'.join(map(str, grid))}", chips_per_host=per_host,
                 hbm_bytes=hbm, peak_flops=peak, hbm_bandwidth=bandwidth)


def devices(tpu: Slice, num_slices: int = 1) -> list:
    """The compile-only devices of `num_slices` copies of `tpu` (needs the libtpu wheel; no TPU)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError(f"compiling for a TPU topology needs libtpu: {EXTRA_HINT}") from None
    # libtpu takes a machine-wide lock file unless told that several processes may load it (a
    # compile-only client needs no exclusive TPU access), and without a TPU VM's metadata it logs
    # errors about the host unless these are set. They are read once, when libtpu loads.
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_ACCELERATOR_TYPE", tpu.name),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    ndim = _GENERATIONS[tpu.generation][1]
    if tpu.chips_per_host == tpu.chips:
        host = chip_grid(tpu.chips, ndim) + (1,) * (3 - ndim)
    else:
        host = (2, 2, 1)
    return list(topologies.get_topology_desc(
        platform="tpu", topology_name=tpu.topology, chip_config_name=_GENERATIONS[tpu.generation][4],
        chips_per_host_bounds=host, num_slices=num_slices).devices)
