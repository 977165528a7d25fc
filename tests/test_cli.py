"""The command-line convention: every entry point is `python -m ouro_jax.<package>` (a `__main__.py`),
importing one never shadows a public function of `ouro_jax`, and mistakes are one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ouro_jax
from ouro_jax import cli

PACKAGE = Path(ouro_jax.__file__).parent
CLI_MODULES = sorted(
    ".".join(("ouro_jax", *path.relative_to(PACKAGE).parent.parts, "__main__"))
    for path in PACKAGE.rglob("__main__.py"))
PUBLIC_FUNCTIONS = sorted(name for name in ouro_jax.__all__ if callable(getattr(ouro_jax, name))
                          and not isinstance(getattr(ouro_jax, name), type))


def test_every_command_is_a_package_main():
    assert {"ouro_jax.train.__main__", "ouro_jax.convert.__main__", "ouro_jax.inference.__main__",
            "ouro_jax.data.__main__"} <= set(CLI_MODULES)
    for name in ouro_jax.__all__:  # no module file may carry a public function's name
        if callable(getattr(ouro_jax, name)):
            assert not (PACKAGE / f"{name}.py").exists() and not (PACKAGE / name).is_dir(), name


@pytest.mark.parametrize("module", CLI_MODULES)
@pytest.mark.slow
def test_importing_a_command_leaves_the_public_api_callable(module):
    package = module.rsplit(".", 1)[0]
    code = (f"import importlib, types, ouro_jax\n"
            f"importlib.import_module({package!r}); importlib.import_module({module!r})\n"
            f"bad = [n for n in {PUBLIC_FUNCTIONS!r} if isinstance(getattr(ouro_jax, n), types.ModuleType)"
            f" or not callable(getattr(ouro_jax, n))]\n"
            f"assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_one_line_messages():
    assert cli.one_line(ValueError("a\n  b\tc")) == "a b c"
    assert cli.one_line(FileNotFoundError("no file matches 'x*.txt'")) == "no file matches 'x*.txt'"
    quoted = AttributeError("'\\'totl_steps\\'\\nDid you mean \"total_steps\" instead of \"totl_steps\"?'")
    assert cli.one_line(quoted) == "unknown config key 'totl_steps'; did you mean 'total_steps'?"


# lm-eval's own command line (argparse) is not ours
ABSL_CLI_MODULES = [m for m in CLI_MODULES if not m.startswith("ouro_jax.evaluate.lm_eval")]


@pytest.mark.parametrize("module", ABSL_CLI_MODULES)
@pytest.mark.slow
def test_unknown_flag_is_one_line(module):
    result = subprocess.run([sys.executable, "-m", module.rsplit(".", 1)[0], "--no_such_flag=1"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == cli.USAGE_ERROR and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and "no_such_flag" in lines[0]
