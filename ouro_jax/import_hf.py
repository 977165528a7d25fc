"""Import a Hugging Face Ouro directory as an ouro_jax checkpoint that training can start from.

    python -m ouro_jax.import_hf --hf_dir=DIR --output_dir=OUT [--dtype=float32] [--overwrite]

Writes OUT/checkpoints/0/params (Orbax, what `ouro_jax.train.checkpoint.restore_params` and
`--config.init_from=OUT` read) and OUT/config.json whose `model` key holds the OuroConfig fields.
Bad input prints one line on stderr and exits with status 1, writing nothing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from absl import app, flags

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face Ouro directory.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory to create.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "dtype of the imported parameters.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output_dir.")


def import_hf(hf_dir: str, output_dir: str, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert `hf_dir` into an ouro_jax checkpoint directory `output_dir`; returns its path."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from ouro_jax.convert import pretrained

    pretrained.check_output_dir(output_dir, overwrite)
    model = pretrained.from_pretrained(hf_dir, dtype=dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with pretrained.staged_directory(output_dir, overwrite) as staging:
        manager = ocp.CheckpointManager(staging / "checkpoints", item_names=("params",),
                                        options=ocp.CheckpointManagerOptions(
                                            create=True, enable_async_checkpointing=False))
        try:
            manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
            manager.wait_until_finished()
        finally:
            manager.close()
        record = {"model": dataclasses.asdict(model.config), "imported_from": str(Path(hf_dir).absolute())}
        (staging / "config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Path(output_dir).absolute()


def main(argv):
    del argv
    try:
        out = import_hf(_HF_DIR.value, _OUTPUT_DIR.value, _DTYPE.value, _OVERWRITE.value)
    except (OSError, ValueError) as err:
        print(f"import_hf: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
        sys.exit(1)
    print(out)


if __name__ == "__main__":
    app.run(main)
