"""Benchmarks of ouro_jax, run by `python -m ouro_jax.benchmarks --bench=NAME[,NAME...] [--json=FILE]`.

  train.compile, train.memory, train.fwd_bwd, train.step   (`benchmarks.train`)
  train.sft                                                (`benchmarks.sft`)
  decode.speed, decode.cache, decode.exit, decode.rows     (`benchmarks.decode`)
  decode.split                                             (`benchmarks.decode_split`)
  convert.roundtrip                                        (`benchmarks.convert`)
  eval.sweep                                               (`benchmarks.eval_sweep`)
  serve                                                    (`benchmarks.serve`)

Each benchmark is a function returning a `common.Result`: markdown (printed) and its figures (added to
the JSON file under the benchmark's name). Nothing depends on the repository checkout: models, data
and the demo run are built from the installed package.
"""

BENCHMARKS = ("train.compile", "train.memory", "train.fwd_bwd", "train.step", "train.sft", "decode.speed",
              "decode.cache", "decode.exit", "decode.rows", "decode.split", "convert.roundtrip", "eval.sweep",
              "serve")
"""The registry of `--bench` names (importing it defines no command-line flags)."""
