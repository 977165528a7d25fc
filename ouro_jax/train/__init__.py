"""Training: `python -m ouro_jax.train --config=configs/NAME.py[:variant] --workdir=DIR`."""
