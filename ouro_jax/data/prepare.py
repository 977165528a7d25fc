"""Tokenise a text corpus into ArrayRecord shards for `data.source = "array_record"`.

  python -m ouro_jax.data.prepare --input=FILES --tokenizer=PATH --output=DIR \
      [--field=text] [--group_by=book,chapter] [--shard_docs=N] [--eos_id=ID] [--overwrite]

FILES are comma-separated .txt / .jsonl paths or globs, read into documents as by the text source
(`pipeline.read_documents`). One record = one document's int32 token ids (EOS appended) as bytes;
shards are DIR/docs-KKKKK-of-NNNNN.array_record with `--shard_docs` documents each, next to
DIR/metadata.json (tokenizer, vocab_size, eos_id, num_docs, num_tokens, shards). Everything is written to a
temporary directory beside DIR and renamed into place at the end. Errors print one line and exit 1.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
from absl import app, flags

from ouro_jax import tokenizer as tok_lib
from ouro_jax.data.pipeline import read_documents, resolve_eos_id


def prepare(input_files, tokenizer: str, output: str, *, field: str = "text", group_by=None,
            shard_docs: int = 10_000, eos_id: int | None = None, overwrite: bool = False) -> dict:
    """Writes the shards and metadata.json into `output`; returns the metadata."""
    from array_record.python.array_record_module import ArrayRecordWriter

    output = os.path.abspath(output)
    if os.path.exists(output) and not (os.path.isdir(output) and (overwrite or not os.listdir(output))):
        raise FileExistsError(f"{output} exists and is not an empty directory (--overwrite replaces it)")
    if shard_docs < 1:
        raise ValueError(f"--shard_docs must be positive, got {shard_docs}")
    tok = tok_lib.load(tokenizer)
    eos_id = resolve_eos_id(tok, eos_id)
    docs = read_documents(input_files, field=field, group_by=group_by, what="--input")
    if not docs:
        raise ValueError(f"no documents in {input_files}")

    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=os.path.dirname(output))
    try:
        num_shards = math.ceil(len(docs) / shard_docs)
        shards, num_tokens = [], 0
        for k in range(num_shards):
            shards.append(f"docs-{k:05d}-of-{num_shards:05d}.array_record")
            writer = ArrayRecordWriter(os.path.join(tmp, shards[-1]), "group_size:1")
            batch = docs[k * shard_docs:(k + 1) * shard_docs]
            for encoding in tok.encode_batch(batch, add_special_tokens=False):
                ids = np.array([*encoding.ids, eos_id], np.int32)
                writer.write(ids.tobytes())
                num_tokens += len(ids)
            writer.close()
        metadata = {"tokenizer": os.path.abspath(tokenizer) if os.path.isfile(tokenizer) else tokenizer,
                    "vocab_size": tok.get_vocab_size(), "eos_id": eos_id, "num_docs": len(docs),
                    "num_tokens": num_tokens, "shards": shards}
        with open(os.path.join(tmp, "metadata.json"), "w") as f:
            json.dump(metadata, f, indent=2)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metadata


def _define_flags() -> None:
    flags.DEFINE_list("input", None, "Comma-separated .txt / .jsonl paths or globs.", required=True)
    flags.DEFINE_string("tokenizer", "ouro", "Tokenizer: 'ouro' or a tokenizer.json path.")
    flags.DEFINE_string("output", None, "Output directory (must not exist or be empty).", required=True)
    flags.DEFINE_string("field", "text", "Text field of .jsonl lines.")
    flags.DEFINE_list("group_by", None, "jsonl fields whose equal consecutive values form one document.")
    flags.DEFINE_integer("shard_docs", 10_000, "Documents per ArrayRecord shard.")
    flags.DEFINE_integer("eos_id", None, "Id appended to each document (default: <|endoftext|>).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty output directory.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    try:
        meta = prepare(f.input, f.tokenizer, f.output, field=f.field, group_by=f.group_by,
                       shard_docs=f.shard_docs, eos_id=f.eos_id, overwrite=f.overwrite)
    except (OSError, ValueError) as e:
        sys.exit(f"prepare: {e}")
    print(f"prepare: {meta['num_docs']} documents, {meta['num_tokens']} tokens, {len(meta['shards'])} shards "
          f"-> {os.path.abspath(f.output)}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
