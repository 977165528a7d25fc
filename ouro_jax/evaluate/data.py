"""Evaluation batches for `python -m ouro_jax.evaluate`: a run's own held-out data, a synthetic task,
every document of local text files, or every conversation of chat .jsonl files (loss and accuracy on the
assistant tokens only, `ouro_jax.data.chat`).

Every batch is a dict of int32 [B, S] arrays with the keys of `ouro_jax.data.pipeline` (input_ids,
targets, loss_mask, answer_mask, segment_ids, positions), all batches of one evaluation the same shape
(the last one padded with empty rows whose masks are 0), so the evaluation compiles once.
"""

from __future__ import annotations

import functools
import glob
import itertools
import json

import grain
import ml_collections

from ouro_jax import run
from ouro_jax import tokenizer as tok
from ouro_jax.cli import UserError
from ouro_jax.data import chat, pipeline
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
    batches = _packed(examples.map(pipeline.document_example), rows, length, num_batches)
    return batches, f"{len(docs)} documents of {files}"


def _packed(examples: grain.MapDataset, rows: int, length: int, num_batches: int | None) -> list[dict]:
    """Examples -> chunks of `length` tokens, first-fit packed into up to `num_batches` batches of `rows`."""
    chunks = grain.experimental.FlatMapIterDataset(examples.to_iter_dataset(), pipeline.SplitChunks(length))
    packed = grain.experimental.FirstFitPackIterDataset(
        chunks, length_struct=dict.fromkeys(pipeline.FEATURES, length), num_packing_bins=rows,
        shuffle_bins=False)
    batches = packed.map(pipeline.packed_row).batch(
        rows, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=rows))
    return list(itertools.islice(batches, num_batches))


def is_chat(files: str) -> bool:
    """Whether `files` are chat .jsonl files: the first record of the first one is a conversation
    ("messages", or "prompt" and "completion")."""
    paths = [p for p in files.split(",") if p]
    if not paths or not all(p.endswith(".jsonl") for p in paths):
        return False
    try:
        with open(glob.glob(paths[0])[0], encoding="utf-8") as f:
            first = json.loads(next(line for line in f if line.strip()))
    except (IndexError, StopIteration, OSError, ValueError):
        return False  # the text reader reports the problem
    return isinstance(first, dict) and ("messages" in first or {"prompt", "completion"} <= first.keys())


def chat_batches(files: str, *, vocab_size: int, tokenizer: str = "ouro", mask: str = "assistant",
                 batch_size: int | None = None, seq_len: int | None = None,
                 num_batches: int | None = None) -> tuple[list[dict], str]:
    """Every conversation of `files` in ChatML, the loss mask on `mask`'s tokens (`tokenizer.CHAT_MASKS`;
    by default the assistant turns' content and closing <|im_end|>), one segment each (longer ones
    truncated to S), packed into rows."""
    rows, length = batch_size or TEXT_BATCH_SIZE, seq_len or TEXT_SEQ_LEN
    data = {"source": "chat", "tokenizer": tokenizer, "seq_len": length,
            "chat": {"files": files, "mask": mask}}
    try:
        pipeline.check_inputs(data, vocab_size=vocab_size)
        cfg = pipeline.resolve_config(data)
        corpus = pipeline.chat_corpus(cfg)
    except (ValueError, OSError) as err:
        raise UserError(f"--data: {err}") from None
    batches = _packed(grain.MapDataset.source(chat.Examples(corpus, length)), rows, length, num_batches)
    return batches, f"{mask} tokens of {files} ({corpus.summary('truncate')})"


def load(data: str, *, model_path: str, model_kind: str, vocab_size: int, seed: int = 0, **options):
    """Dispatch `--data`: "" (the run's own data; only for a run or one of its steps), a task name, chat
    .jsonl files (`is_chat`) or text files. `options`: batch_size, seq_len, num_batches; tokenizer for
    text and chat; field for text; chat_mask for chat."""
    text_options = {k: options.pop(k) for k in ("tokenizer", "field") if k in options}
    chat_mask = options.pop("chat_mask", "assistant")
    if not data:
        if model_kind == "hf":
            raise UserError(f"--model={model_path} is a Hugging Face directory: pass --data (text files "
                            f"or a task: {', '.join(TASKS)})")
        return run_batches(model_path, vocab_size=vocab_size, **options)
    if data in TASKS:
        return task_batches(data, vocab_size=vocab_size, seed=seed, **options)
    if is_chat(data):
        return chat_batches(data, vocab_size=vocab_size, tokenizer=text_options.get("tokenizer", "ouro"),
                            mask=chat_mask, **options)
    return text_batches(data, vocab_size=vocab_size, **text_options, **options)
