"""`python -m ouro_jax.convert`: weights between ouro_jax runs and Hugging Face Ouro directories.

    # export: a run (its latest checkpoint), one of its steps, or an HF directory -> HF directory
    python -m ouro_jax.convert --to=hf --source=runs/demo --output_dir=export/demo \
        [--dtype=bfloat16] [--tokenizer=ouro|PATH|none] [--auto_map=local|hub] [--max_shard_size=5GB]
    # import: an HF Ouro directory -> a run that training can start from (--config.init_from=OUT)
    python -m ouro_jax.convert --to=run --source=Ouro-1.4B --output_dir=runs/ouro_1p4b [--dtype=float32]

The export loads with `transformers.AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
and with `ouro_jax.from_pretrained(DIR)`. Outputs are written to a temporary directory and renamed when
complete. `--overwrite` replaces only an earlier output of the same kind; an output that is, contains or
lies inside the source or any training run is refused. Bad input prints one line and exits with 1.
"""

from __future__ import annotations

from absl import flags

from ouro_jax import cli

_TO = flags.DEFINE_enum("to", None, ["hf", "run"], "hf: export a Hugging Face directory; run: import one "
                        "as an ouro_jax run.")
_SOURCE = flags.DEFINE_string("source", None, "What to convert: an ouro_jax run, RUN/checkpoints/<step>, "
                              "or a Hugging Face Ouro directory.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory to create.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32", "float16"],
                           "dtype of the written weights (default: bfloat16 for hf, float32 for run).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "--to=hf: 'ouro' (the bundled Ouro tokenizer), 'bytes', a tokenizer.json path or "
    "directory, or 'none' (default: the source's own: its tokenizer.json or its run's data.tokenizer; none "
    "for a synthetic-task run).")
_AUTO_MAP = flags.DEFINE_enum(
    "auto_map", "local", ["local", "hub"], "--to=hf: local ships our modeling code (transformers 5); hub "
    "points at the official ByteDance/Ouro-1.4B remote code (transformers < 4.56).")
_HUB_REPO = flags.DEFINE_string("hub_repo", "ByteDance/Ouro-1.4B", "Repository of --auto_map=hub.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "--to=hf: shard the weights above this size.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier output of this command.")
flags.mark_flags_as_required(["to", "source", "output_dir"])


def main(argv):
    del argv
    from ouro_jax.convert import transfer  # after flag parsing, so --help stays fast

    if _TO.value == "hf":
        out = transfer.export_hf(_SOURCE.value, _OUTPUT_DIR.value, _DTYPE.value or "bfloat16",
                                 _TOKENIZER.value, _AUTO_MAP.value, _OVERWRITE.value, _MAX_SHARD_SIZE.value,
                                 _HUB_REPO.value)
    else:
        out = transfer.import_hf(_SOURCE.value, _OUTPUT_DIR.value, _DTYPE.value or "float32",
                                 _OVERWRITE.value)
    print(out)


if __name__ == "__main__":
    cli.run(main)
