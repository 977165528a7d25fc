"""convert.roundtrip: time and peak memory of exporting and importing a full-size Ouro, against the goal
"peak RSS <= 1.5 x the model's bytes".

Each phase runs in its own Python process, whose peak RSS the parent reads from `os.wait4` (ru_maxrss of
that child alone):
  baseline  a process that only imports jax and starts its CPU backend (the interpreter's overhead);
  export    builds a random model of the preset's shape directly in `dtype` (parameter by parameter,
            never a float32 copy), then `save_pretrained`s it. The child reports the high-water mark
            (VmHWM) of each phase, reset in between through /proc/self/clear_refs, so the exporter's
            own peak is shown apart from building the model (the reset also lowers what wait4 sees);
  import    `from_pretrained` of that export in `dtype`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ouro_jax.benchmarks.common import Result, table

PHASES = ("baseline", "export", "import")


def _high_water_mark() -> int:
    """This process's peak RSS in bytes since start or the last `_reset_high_water_mark`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_high_water_mark() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def random_model(config):
    """An `Ouro` of `config`'s shape filled one parameter at a time in its parameter dtype: normal(0,
    initializer_range) matrices, ones for norms, zeros for the gate bias; at most one parameter exists
    twice (its host and device copies) at any time."""
    import jax
    import numpy as np
    from flax import nnx

    from ouro_jax.model.ouro import Ouro

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Ouro(config, rngs=nnx.Rngs(0))))
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "bias":
            return jax.numpy.zeros(leaf.shape, leaf.dtype)
        if name == "weight":  # every RMSNorm
            return jax.numpy.ones(leaf.shape, leaf.dtype)
        host = np.empty(leaf.shape, leaf.dtype)
        for i in range(leaf.shape[0]):  # one row (or one layer) at a time in float32
            host[i] = rng.standard_normal(leaf.shape[1:], np.float32) * config.initializer_range
        return jax.device_put(host).block_until_ready()

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, params))
    return nnx.merge(graphdef, state)


def _run_phase(phase: str, preset: str, dtype: str, directory: str) -> dict:
    """One phase in this process; returns its figures (seconds, bytes)."""
    import jax

    if phase == "baseline":
        jax.devices()
        return {}
    from ouro_jax.convert import pretrained
    from ouro_jax.model.config import PRESETS

    if phase == "import":
        start = time.perf_counter()
        model = pretrained.from_pretrained(directory, dtype=dtype)
        jax.block_until_ready(jax.tree.leaves(model))
        return {"import_s": time.perf_counter() - start, "import_peak": _high_water_mark()}
    config = PRESETS[preset](dtype=dtype, param_dtype=dtype)
    start = time.perf_counter()
    model = random_model(config)
    built, build_peak = time.perf_counter(), _high_water_mark()
    _reset_high_water_mark()
    pretrained.save_pretrained(model, directory, dtype=dtype)
    return {"build_s": built - start, "build_peak": build_peak,
            "export_s": time.perf_counter() - built, "export_peak": _high_water_mark(),
            "model_bytes": sum(x.nbytes for x in jax.tree.leaves(model))}


def child() -> None:
    """Entry of a phase's process: argv = [phase, directory, preset, dtype]; prints the figures as JSON."""
    phase, directory, preset, dtype = sys.argv[1:]
    print(json.dumps(_run_phase(phase, preset, dtype, directory)))


def _child(phase: str, directory: Path, preset: str, dtype: str) -> tuple[dict, float, int]:
    """(figures, wall seconds, peak RSS bytes from wait4) of one phase in a fresh process."""
    args = [sys.executable, "-c", "from ouro_jax.benchmarks import convert; convert.child()", phase,
            str(directory), preset, dtype]
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"convert.roundtrip phase {phase} failed (status {status})")
    return json.loads(output.strip().splitlines()[-1]), wall, usage.ru_maxrss * 1024


def roundtrip(*, preset: str = "ouro_1p4b", dtype: str = "bfloat16", workdir: str | None = None,
              keep: bool = False) -> Result:
    """Export then import a random model of `preset` in `dtype` (module docstring); the export goes to
    `workdir` (default: a temporary directory) and is deleted unless `keep`."""
    from ouro_jax.model.config import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"--preset={preset} must be one of {sorted(PRESETS)}")
    root = Path(workdir or tempfile.mkdtemp(prefix="ouro_roundtrip-"))
    directory = root / f"{preset}-{dtype}"
    try:
        _, base_wall, base_peak = _child("baseline", directory, preset, dtype)
        exported, export_wall, export_peak = _child("export", directory, preset, dtype)
        imported, import_wall, import_peak = _child("import", directory, preset, dtype)
        files = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
            if not workdir:
                shutil.rmtree(root, ignore_errors=True)
    model = exported["model_bytes"]
    gb = lambda b: f"{b / 1e9:.2f} GB"
    phases = [
        ("baseline process: import jax (wait4)", base_wall, base_peak),
        ("export process: build random model (VmHWM)", exported["build_s"], exported["build_peak"]),
        ("export process: save_pretrained (VmHWM)", exported["export_s"], exported["export_peak"]),
        ("export process, whole (wall)", export_wall, max(exported["build_peak"], export_peak)),
        ("import process: from_pretrained (VmHWM)", imported["import_s"], imported["import_peak"]),
        ("import process, whole (wall, wait4)", import_wall, import_peak),
    ]
    worst = max(exported["export_peak"], import_peak)
    text = (f"{preset} in {dtype}: model {gb(model)} ({model:,} B), safetensors {gb(files)}\n\n"
            + table(["phase", "seconds", "peak RSS", "/ model"],
                    [[name, f"{s:.1f}", gb(peak), f"{peak / model:.2f} x"] for name, s, peak in phases])
            + f"\n\ngoal: peak RSS of export and import <= 1.5 x model bytes: {worst / model:.2f} x, "
            f"{'met' if worst <= 1.5 * model else 'NOT met'} (each figure includes the baseline)")
    return Result(text, {
        "preset": preset, "dtype": dtype, "model_bytes": model, "safetensors_bytes": files,
        "phases": [{"phase": name, "seconds": s, "peak_rss_bytes": peak} for name, s, peak in phases],
        "export_s": exported["export_s"], "import_s": imported["import_s"],
        "peak_over_model": worst / model, "goal_met": worst <= 1.5 * model})
