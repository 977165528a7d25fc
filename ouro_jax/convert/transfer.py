"""Whole-directory conversions behind `python -m ouro_jax.convert`: a run (or one of its steps, or an HF
directory) to a Hugging Face directory, and a Hugging Face directory to a run that training can start from.
Both check the output directory before the (long) load and write it atomically (`pretrained`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from ouro_jax import run
from ouro_jax.convert import pretrained
from ouro_jax.tokenizer import load


def export_hf(source: str, output_dir: str, dtype: str = "bfloat16", tokenizer: str | None = None,
              auto_map: str = "local", overwrite: bool = False, max_shard_size: str = "5GB",
              hub_repo: str = "ByteDance/Ouro-1.4B") -> Path:
    """Load `source` in `dtype` and write it as a Hugging Face directory (`pretrained.save_pretrained`)
    with `tokenizer` ("none": without one; None: the source's own, `run.tokenizer_of`)."""
    root = run.locate(source).root
    pretrained.check_output_dir(output_dir, overwrite, kind="export", source=root)  # before the long load
    tokenizer = run.tokenizer_of(source) if tokenizer is None else tokenizer
    tok = None if tokenizer in (None, "none") else load(tokenizer)
    model = pretrained.from_pretrained(source, dtype=dtype)
    return pretrained.save_pretrained(model, output_dir, dtype=dtype, tokenizer=tok,
                                      max_shard_size=max_shard_size, auto_map=auto_map, overwrite=overwrite,
                                      hub_repo=hub_repo)


def import_hf(source: str, output_dir: str, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the Hugging Face directory `source` as a run: RUN/checkpoints/0/params and RUN/config.json
    (`model` = the OuroConfig fields, `imported_from` = the source)."""
    location = run.locate(source)
    if location.kind != "hf":
        raise pretrained.CheckpointError(f"--source={source} is an ouro_jax run already; use "
                                         f"--config.init_from={source}")
    pretrained.check_output_dir(output_dir, overwrite, kind="import", source=location.root)
    model = pretrained.from_pretrained(source, dtype=dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with pretrained.staged_directory(output_dir, overwrite, kind="import", source=location.root) as staging:
        run.save_params(staging, params, step=0)
        run.write_config(staging, {"model": dataclasses.asdict(model.config),
                                   "imported_from": str(location.root)})
    return Path(output_dir).absolute()
