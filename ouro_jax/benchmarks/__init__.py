"""Benchmarks of ouro_jax, run by `python -m ouro_jax.benchmarks --bench=NAME[,NAME...] [--json=FILE]`.

  train.compile, train.memory, train.fwd_bwd, train.step   (`benchmarks.train`)
  decode.speed, decode.cache, decode.exit                  (`benchmarks.decode`)
  convert.roundtrip                                        (`benchmarks.convert`)

Each benchmark is a function returning a `common.Result`: markdown (printed) and its figures (added to
the JSON file under the benchmark's name). Nothing depends on the repository checkout: models, data
and the demo run are built from the installed package.
"""
