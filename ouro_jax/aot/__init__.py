"""Ahead-of-time compilation for TPU slices on a CPU host (`python -m ouro_jax.aot`).

  topology  Cloud TPU names ("v5p-128") -> chips, topology string, HBM, peak FLOP/s; compile-only devices
  flops     analytic FLOPs of the train step and of generation (XLA counts a scanned body once)
  compile   compile the trainer's exact train step / generate for a slice: memory per chip, fits, search
  report    the table and JSON of a compile
"""
