"""`python -m ouro_jax.generate ...`: the generation command line (see `ouro_jax.inference.cli`).

This module only runs the CLI; `ouro_jax.generate` in Python is the generate function, so import the
CLI code from `ouro_jax.inference.cli`, not from here.
"""

import sys

from ouro_jax.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
