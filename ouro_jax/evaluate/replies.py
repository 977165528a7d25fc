"""`python -m ouro_jax.evaluate.replies --model=PATH [--data=CHAT.jsonl]`: answer accuracy of generated
chat replies, at every fixed depth. Without --data, PATH must be a chat run: its held-out conversations
(the split its training evaluates on) are scored.

Each conversation's last assistant turn is the reference: the model is prompted with the turns before it
(ChatML, then `<|im_start|>assistant\\n`), replies greedily until `<|im_end|>` / `<|endoftext|>` (at most
--max_new_tokens), and a reply counts as correct when it equals the reference after stripping whitespace.
Replies are generated with every token running loops 1..k, for k = 1..T. Prints one line per depth.
Text goes through PATH/tokenizer.json, a run's data.tokenizer, or --tokenizer.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from ouro_jax import cli, run

_MODEL = flags.DEFINE_string("model", None, "Run directory, step directory or Hugging Face Ouro directory.")
_DATA = flags.DEFINE_string("data", "", "Chat .jsonl files (comma-separated paths or globs); empty: the "
                            "run's held-out conversations.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'ouro', 'bytes' or a tokenizer.json (default: PATH's).")
_LIMIT = flags.DEFINE_integer("limit", 200, "Conversations to score (the first ones).", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 50, "Replies generated at once.", lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 16, "Tokens per reply at most.", lower_bound=1)
flags.mark_flag_as_required("model")


def prompts_and_references(tokenizer, conversations) -> tuple[list[list[int]], list[str]]:
    """Prompt ids (the turns before the last assistant turn, and the assistant prompt) and that turn's
    content, per conversation."""
    from ouro_jax import tokenizer as tok

    prompts, references = [], []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(tok.encode_chat(tokenizer, messages[:last], add_generation_prompt=True))
        references.append(messages[last]["content"])
    return prompts, references


def reply_accuracy(model, tokenizer, conversations, *, exit_at_loop: int, batch_size: int,
                   max_new_tokens: int) -> float:
    """Fraction of `conversations` whose greedy reply at depth `exit_at_loop` equals the reference."""
    from ouro_jax import tokenizer as tok
    from ouro_jax.inference.decode import generate, left_pad

    prompts, references = prompts_and_references(tokenizer, conversations)
    correct = 0
    for start in range(0, len(prompts), batch_size):
        ids, lengths = left_pad(prompts[start:start + batch_size])
        out = generate(model, ids, max_new_tokens, prompt_lengths=lengths, exit_at_loop=exit_at_loop,
                       stop_tokens=tok.STOP_IDS)
        for row, reference in zip(out.tokens, references[start:start + batch_size], strict=True):
            stops = np.flatnonzero(np.isin(row, tok.STOP_IDS))
            reply = row[:stops[0]] if stops.size else row
            correct += tokenizer.decode(reply.tolist()).strip() == reference.strip()
    return correct / len(prompts)


def main(argv):
    del argv
    from ouro_jax import tokenizer as tok
    from ouro_jax.convert.pretrained import from_pretrained
    from ouro_jax.data import chat, pipeline

    model = from_pretrained(_MODEL.value)
    tokenizer = tok.load(_TOKENIZER.value or run.tokenizer_of(_MODEL.value) or "ouro")
    try:
        if _DATA.value:
            paths = pipeline.expand_files(_DATA.value, "--data", keep=(chat.GENERATED,))
            conversations = chat.read_conversations(paths)
        else:
            data = pipeline.resolve_config(run.read_config(_MODEL.value).data)
            if data.source != "chat":
                raise ValueError(f"{_MODEL.value} was not trained on chat data: pass --data")
            every = chat.read_conversations(pipeline.expand_files(data.chat.files, "data.chat.files",
                                                                  keep=(chat.GENERATED,)))
            conversations = [every[i] for i in pipeline.heldout_split(len(every), data.eval_fraction)[1]]
    except (ValueError, OSError) as err:
        raise cli.UserError(str(err)) from None
    conversations = conversations[:_LIMIT.value]
    for k in range(1, model.config.total_ut_steps + 1):
        accuracy = reply_accuracy(model, tokenizer, conversations, exit_at_loop=k,
                                  batch_size=_BATCH_SIZE.value, max_new_tokens=_MAX_NEW_TOKENS.value)
        print(f"loops 1..{k}: {accuracy:.3f} of {len(conversations)} replies correct")


if __name__ == "__main__":
    cli.run(main)
