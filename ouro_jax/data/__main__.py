"""`python -m ouro_jax.data`: tokenise a text corpus into ArrayRecord shards for `data.source="array_record"`.

    python -m ouro_jax.data --input=FILES --tokenizer=ouro --output=DIR \
        [--field=text] [--group_by=book,chapter] [--shard_docs=N] [--eos_id=ID] [--overwrite]

FILES are comma-separated .txt / .jsonl paths or globs (see `ouro_jax.data.prepare.prepare` for the
layout of DIR). Bad input prints one line `error: ...` and exits with 1; nothing is left half-written.
"""

from __future__ import annotations

import os

from absl import flags

from ouro_jax import cli
from ouro_jax.data.prepare import prepare

_INPUT = flags.DEFINE_list("input", None, "Comma-separated .txt / .jsonl paths or globs.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "ouro", "Tokenizer: 'ouro' or a tokenizer.json path.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (must not exist or be empty).")
_FIELD = flags.DEFINE_string("field", "text", "Text field of .jsonl lines.")
_GROUP_BY = flags.DEFINE_list("group_by", None, "jsonl fields whose equal consecutive values form one "
                              "document.")
_SHARD_DOCS = flags.DEFINE_integer("shard_docs", 10_000, "Documents per ArrayRecord shard.")
_EOS_ID = flags.DEFINE_integer("eos_id", None, "Id appended to each document (default: <|endoftext|>).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty output directory.")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
    del argv
    meta = prepare(_INPUT.value, _TOKENIZER.value, _OUTPUT.value, field=_FIELD.value,
                   group_by=_GROUP_BY.value, shard_docs=_SHARD_DOCS.value, eos_id=_EOS_ID.value,
                   overwrite=_OVERWRITE.value)
    print(f"{meta['num_docs']} documents, {meta['num_tokens']} tokens, {len(meta['shards'])} shards -> "
          f"{os.path.abspath(_OUTPUT.value)}")


if __name__ == "__main__":
    cli.run(main)
