"""`python -m ouro_jax.evaluate.lm_eval --model_args pretrained=PATH[,exit_threshold=q,...] --tasks TASKS ...`

lm-evaluation-harness's own command line (`lm-eval run`; every option of lm-eval 0.4.13 works, e.g.
--include_path DIR for local task YAMLs, --output_path, --limit) with the model "ouro_jax" registered and
chosen by default. Model args: `ouro_jax.evaluate.lm_eval.model`. A mistake (an unknown task, a bad path or
model arg) prints one line `error: ...` on stderr and exits non-zero.
"""

from __future__ import annotations

import sys

from ouro_jax import cli


def main(argv: list[str]) -> None:
    from lm_eval.__main__ import cli_evaluate

    import ouro_jax.evaluate.lm_eval  # noqa: F401 - registers the "ouro_jax" model

    args = argv[1:]
    if args and args[0] not in ("run", "ls", "validate", "-h", "--help"):
        args = ["run", *args]
    if args[:1] == ["run"] and not any(a == "--model" or a.startswith("--model=") for a in args):
        args = [*args, "--model", "ouro_jax"]
    sys.argv = ["python -m ouro_jax.evaluate.lm_eval", *args]
    try:
        cli_evaluate()
    except (ValueError, KeyError, OSError) as err:
        cli.fail(err)


if __name__ == "__main__":
    main(sys.argv)
