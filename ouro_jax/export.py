"""Export an ouro_jax checkpoint as a Hugging Face Ouro directory.

    python -m ouro_jax.export --checkpoint=RUN_DIR_OR_STEP --output_dir=DIR \
        [--dtype=bfloat16] [--tokenizer=ouro|PATH|none] [--auto_map=local|hub] [--overwrite]
        [--max_shard_size=5GB] [--hub_repo=ByteDance/Ouro-1.4B]

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
and with `ouro_jax.convert.pretrained.from_pretrained(DIR)`. Bad input prints one line on stderr and
exits with status 1, writing nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "ouro_jax run directory (latest checkpoint), RUN/checkpoints/<step>, or a "
    "Hugging Face Ouro directory.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory to create.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                           "dtype of the exported weights.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "ouro", "'ouro' (the bundled Ouro tokenizer), a tokenizer.json path or directory, or "
    "'none'.")
_AUTO_MAP = flags.DEFINE_enum(
    "auto_map", "local", ["local", "hub"], "local: ship our modeling code (transformers 5); hub: point "
    "at the official ByteDance/Ouro-1.4B remote code (transformers < 4.56).")
_HUB_REPO = flags.DEFINE_string("hub_repo", "ByteDance/Ouro-1.4B", "Repository of --auto_map=hub.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output_dir.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Shard the weights above this size.")


def export(checkpoint: str, output_dir: str, dtype: str = "bfloat16", tokenizer: str | None = "ouro",
           auto_map: str = "local", overwrite: bool = False, max_shard_size: str = "5GB",
           hub_repo: str = "ByteDance/Ouro-1.4B") -> Path:
    """Load `checkpoint` in `dtype` and write it to `output_dir` (see `pretrained.save_pretrained`)."""
    from ouro_jax.convert import pretrained
    from ouro_jax.tokenizer import load

    pretrained.check_output_dir(output_dir, overwrite)  # before the (long) load
    tok = None if tokenizer in (None, "none") else load(tokenizer)
    model = pretrained.from_pretrained(checkpoint, dtype=dtype)
    return pretrained.save_pretrained(model, output_dir, dtype=dtype, tokenizer=tok,
                                      max_shard_size=max_shard_size, auto_map=auto_map, overwrite=overwrite,
                                      hub_repo=hub_repo)


def main(argv):
    del argv
    try:
        out = export(_CHECKPOINT.value, _OUTPUT_DIR.value, _DTYPE.value, _TOKENIZER.value, _AUTO_MAP.value,
                     _OVERWRITE.value, _MAX_SHARD_SIZE.value, _HUB_REPO.value)
    except (OSError, ValueError) as err:
        print(f"export: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
        sys.exit(1)
    print(out)


if __name__ == "__main__":
    app.run(main)
