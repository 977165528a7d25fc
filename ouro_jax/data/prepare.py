"""Tokenise a text corpus into ArrayRecord shards for `data.source = "array_record"`
(the library side of `python -m ouro_jax.data`).

`input_files` are .txt / .jsonl paths or globs, read into documents as by the text source
(`pipeline.read_documents`). One record = one document's int32 token ids (EOS appended) as bytes;
shards are DIR/docs-KKKKK-of-NNNNN.array_record with `shard_docs` documents each, next to
DIR/metadata.json (tokenizer, vocab_size, eos_id, num_docs, num_tokens, shards). Everything is written
to a temporary directory beside DIR and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import numpy as np

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

