"""The one error path of every `python -m ouro_jax.<package>` command.

    from ouro_jax import cli
    ...absl flags at module level...
    def main(argv): ...
    if __name__ == "__main__":
        cli.run(main)

`run` parses the flags (a bad flag, an unknown `--config.*` key or a config file that cannot be loaded
prints one line), keeps library logging (Orbax, grain, absl INFO) quiet unless `--verbosity` is given,
and turns the user mistakes that `main` raises (`UserError`, `ValueError`, `OSError`) into one line
`error: ...` on stderr and exit status 1 (`USAGE_ERROR`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging

USAGE_ERROR = 1
"""Exit status of a command refused because of its input (nothing was written)."""


class UserError(ValueError):
    """A mistake in what the user asked for; the message is shown as one line."""


def one_line(err: BaseException | str) -> str:
    """An exception's message collapsed to one readable line (ml_collections' quoted reprs unwrapped)."""
    text = str(err)
    if "Traceback (most recent call last)" in text:  # ml_collections wraps get_config's exception
        text = _last_exception(text)
    suggestion = re.search(r"'([^']+)'.*Did you mean \"([^\"]+)\" instead of \"([^\"]+)\"", text, re.S)
    if suggestion:
        return f"unknown config key {suggestion.group(3)!r}; did you mean {suggestion.group(2)!r}?"
    text = " ".join(text.replace("\\n", " ").replace("\\'", "'").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a repr'd message (KeyError, ...)
        text = text[1:-1]
    return text or type(err).__name__


def _last_exception(text: str) -> str:
    """`flag --config=FILE: ... Traceback ... Kind: message` -> `FILE: message` (the kind kept unless it is
    one of ours or a ValueError)."""
    flag = re.match(r"flag --\w+=([^:\s]+)", text)
    kind, _, message = text.strip().splitlines()[-1].partition(": ")
    kind = kind.rsplit(".", 1)[-1]
    if kind not in ("ConfigError", "UserError", "ValueError"):
        message = f"{kind}: {message}"
    path = flag.group(1) if flag else None
    named = path is not None and os.path.basename(path) in message.split(":", 1)[0]
    return message if path is None or named else f"{path}: {message}"


def fail(message: BaseException | str, status: int = USAGE_ERROR):
    """Print `error: message` (one line) on stderr and exit with `status`."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(status)


def _parse(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (flags.Error, ValueError) as err:
        fail(err)
    except OSError as err:  # ml_collections: a config file that cannot be read
        missing = re.search(r"No such file or directory: '([^']+)'", str(err))
        fail(f"no such config file: {missing.group(1)}" if missing else err)
    except Exception as err:  # raised by a config file's own code (KeyError, NameError, SyntaxError, ...)
        fail(f"{type(err).__name__}: {one_line(err)}")


def quiet_logs() -> None:
    """WARNING and above only, for absl and for the libraries that log every save/compile at INFO."""
    logging.set_verbosity(logging.WARNING)
    for name in ("orbax", "absl", "jax", "grain", "tensorstore"):
        std_logging.getLogger(name).setLevel(std_logging.WARNING)


def run(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run(main)` with the one-line error path described in the module docstring."""

    def guarded(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]} (every option is a --flag)")
        if not flags.FLAGS["verbosity"].present:
            quiet_logs()
        try:
            status = main(argv)
        except (ValueError, OSError) as err:  # UserError is a ValueError
            fail(err)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(status or 0)

    app.run(guarded, flags_parser=_parse)
