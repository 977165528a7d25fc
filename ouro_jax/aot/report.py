"""Human-readable tables of `ouro_jax.aot.compile` reports (the JSON holds the same fields, raw)."""

from __future__ import annotations

from typing import Any

GiB = 2**30


def _bytes(x) -> str:
    return "?" if x is None else f"{x / GiB:.2f} GiB"


def _flops(x) -> str:
    return f"{x:.3e}"


def _ms(x: float | None) -> str:
    return "?" if x is None else f"{x * 1e3:.3f} ms"


FORMATS = {
    "state_bytes_total": _bytes, "state_bytes_per_chip": _bytes, "argument_bytes_per_chip": _bytes,
    "temp_bytes_per_chip": _bytes, "hbm_bytes_per_chip": _bytes, "hbm_capacity_per_chip": _bytes,
    "model_flops_per_step": _flops, "executed_flops_per_step": _flops, "flops": _flops,
    "step_time_lower_bound_s": lambda x: f"{x:.3f} s", "time_lower_bound_s": _ms,
    "compute_time_lower_bound_s": _ms, "memory_time_lower_bound_s": _ms,
    "mfu_at_lower_bound": lambda x: f"{100 * x:.1f} %", "compile_s": lambda x: f"{x:.1f} s",
    "init_compile_s": lambda x: f"{x:.1f} s", "seconds": lambda x: f"{x:.1f} s",
}


def table(report: dict[str, Any]) -> str:
    """One `name  value` line per field."""
    width = max(map(len, report))
    return "\n".join(f"{k:<{width}}  {FORMATS.get(k, str)(v)}" for k, v in report.items())


def summary_row(report: dict[str, Any]) -> str:
    """One line per train-step compile (for `--search` progress)."""
    return (f"rows_per_chip={report['rows_per_chip']} grad_accum_steps={report['grad_accum_steps']}: "
            f"HBM {_bytes(report['hbm_bytes_per_chip'])} of {_bytes(report['hbm_capacity_per_chip'])} "
            f"({'fits' if report['fits'] else 'does not fit'}), compiled in {report['compile_s']:.0f} s")
