"""Test setup: 8 fake CPU devices before JAX is imported, XLA's CPU backend at optimisation level 0, one
XLA compilation cache per test run, absl flags marked parsed (grain workers)."""

import gc
import os
import re
import shutil
import tempfile

import pytest

os.environ["JAX_PLATFORMS"] = "cpu"
_DEVICES = "--xla_force_host_platform_device_count"  # set exactly once, also in xdist workers
# The suite compiles hundreds of small programs that each run a few steps: without LLVM's optimisations
# XLA compiles them in about two thirds of the time (tests/test_compaction.py: 118 s -> 79 s). The few
# commands that train for hundreds of steps run optimised again (`util.optimized_env`).
FAST_COMPILE = "--xla_backend_optimization_level=0"
_OTHER_FLAGS = re.sub(_DEVICES + r"=\d+|--xla_backend_optimization_level=\d+", "",
                      os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_OTHER_FLAGS} {_DEVICES}=8 {FAST_COMPILE}".strip()

# The xdist workers (which inherit this environment) and every process a test starts share one persistent
# compilation cache, every program in it: the suite compiles the same small programs in many tests and
# commands. The process that made it removes it at the end; a caller's JAX_COMPILATION_CACHE_DIR is kept.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ouro_jax_tests_xla_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_configure(config):
    import jax
    from absl import flags

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1)))
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test file. A pytest-xdist worker runs half the suite in one
    process, and XLA keeps each compiled CPU program's code mapped: after some hundreds of programs the
    process reaches the kernel's vm.max_map_count (65530 here) and XLA crashes inside a compile (seen as
    SIGABRT and SIGSEGV in late files). Programs a later file needs again come from the persistent
    compilation cache."""
    yield
    import jax

    from ouro_jax.inference import step

    step.clear_compiled()
    jax.clear_caches()
    gc.collect()


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
