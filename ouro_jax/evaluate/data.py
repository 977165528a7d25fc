"""Evaluation batches for `python -m ouro_jax.evaluate`: a run's own held-out data, a synthetic task, or
every document of local text files.

Every batch is a dict of int32 [B, S] arrays with the keys of `ouro_jax.data.pipeline` (input_ids,
targets, loss_mask, answer_mask, segment_ids, positions), all batches of one evaluation the same shape
(the last one padded with empty rows whose masks are 0), so the evaluation compiles once.
"""

from __future__ import annotations

import functools
import itertools

import grain
import ml_collections

from ouro_jax import run
from ouro_jax import tokenizer as tok
from ouro_jax.cli import UserError
from ouro_jax.data import pipeline
from ouro_jax.data.tasks import TASKS

TEXT_SEQ_LEN = 256
TEXT_BATCH_SIZE = 8
TASK_BATCHES = 8


def run_batches(path, *, vocab_size: int, batch_size: int | None = None, seq_len: int | None = None,
                num_batches: int | None = None) -> tuple[list[dict], str]:
    """The held-out batches the run at `path` evaluates during training (its config.json `data` and
    `seed`), optionally with another batch size, row length or number of batches.
    Returns (batches, a one-line description)."""
    config = run.read_config(path)
    if "data" not in config:
        raise UserError(f"{path}: the run's config.json has no `data` (an imported checkpoint?); pass --data")
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.update({k: v for k, v in (("batch_size", batch_size), ("seq_len", seq_len)) if v})
    num_batches = num_batches or data.get("eval_batches", TASK_BATCHES)
    pipeline.check_inputs(data, vocab_size=vocab_size)
    batches = pipeline.build_eval_batches(data, seed=config.get("seed", 0), num_batches=num_batches)
    return batches, f"the run's held-out {data.source} data"


def task_batches(name: str, *, vocab_size: int, seed: int, batch_size: int | None = None,
                 seq_len: int | None = None, num_batches: int | None = None) -> tuple[list[dict], str]:
    """Held-out batches of the synthetic task `name` (`ouro_jax.data.tasks.TASKS`) with its default
    settings (`pipeline.default_config()`)."""
    data = {"source": name, **{k: v for k, v in (("batch_size", batch_size), ("seq_len", seq_len)) if v}}
    pipeline.check_inputs(data, vocab_size=vocab_size)
    batches = pipeline.build_eval_batches(data, seed=seed, num_batches=num_batches or TASK_BATCHES)
    return batches, f"held-out {name} task (seed {seed})"


def text_batches(files: str, *, vocab_size: int, tokenizer: str = "ouro", field: str = "text",
                 batch_size: int | None = None, seq_len: int | None = None,
                 num_batches: int | None = None) -> tuple[list[dict], str]:
    """Every document of `files` (.txt: blank-line-separated paragraphs; .jsonl: `field` of each line;
    comma-separated paths or globs) tokenised with EOS appended, split into chunks of S tokens and
    first-fit packed into rows (documents never attend to each other), up to `num_batches` batches."""
    docs = pipeline.read_documents(files, field=field, what="--data")
    if not docs:
        raise UserError(f"--data={files}: no text in the file(s) (empty documents only)")
    encoder = tok.load(tokenizer)
    if encoder.get_vocab_size() > vocab_size:
        raise UserError(f"tokenizer {tokenizer!r} has {encoder.get_vocab_size()} tokens but the model's "
                        f"vocab_size is {vocab_size}: this model was not trained on this tokenizer's text")
    rows, length = batch_size or TEXT_BATCH_SIZE, seq_len or TEXT_SEQ_LEN
    examples = grain.MapDataset.source(docs).map(functools.partial(
        pipeline.tokenize, tokenizer=encoder, eos_id=pipeline.resolve_eos_id(encoder)))
    chunks = grain.experimental.FlatMapIterDataset(
        examples.map(pipeline.document_example).to_iter_dataset(), pipeline.SplitChunks(length))
    packed = grain.experimental.FirstFitPackIterDataset(
        chunks, length_struct=dict.fromkeys(pipeline.FEATURES, length), num_packing_bins=rows,
        shuffle_bins=False)
    batches = packed.map(pipeline.packed_row).batch(
        rows, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=rows))
    batches = list(itertools.islice(batches, num_batches))
    return batches, f"{len(docs)} documents of {files}"


def load(data: str, *, model_path: str, model_kind: str, vocab_size: int, seed: int = 0, **options):
    """Dispatch `--data`: "" (the run's own data; only for a run or one of its steps), a task name, or
    text files. `options`: batch_size, seq_len, num_batches, and for text tokenizer and field."""
    text_options = {k: options.pop(k) for k in ("tokenizer", "field") if k in options}
    if not data:
        if model_kind == "hf":
            raise UserError(f"--model={model_path} is a Hugging Face directory: pass --data (text files "
                            f"or a task: {', '.join(TASKS)})")
        return run_batches(model_path, vocab_size=vocab_size, **options)
    if data in TASKS:
        return task_batches(data, vocab_size=vocab_size, seed=seed, **options)
    return text_batches(data, vocab_size=vocab_size, **text_options, **options)
