"""Chat conversations for supervised fine-tuning: .jsonl reading, a generated example set, and the
examples the packer takes.

A .jsonl line is one conversation, in either common format:
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}   (multi-turn)
  {"prompt": P, "completion": C}   a string pair (one user turn, one assistant turn) or two message lists
Rendering and the trained-token mask: `ouro_jax.tokenizer.encode_chat_for_training`.

`files` may name "generated" (`GENERATED`): `generated_conversations()`, arithmetic conversations made
by a seeded generator, so a chat fine-tune runs without any file.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from ouro_jax import tokenizer as tok

OVERFLOWS = ("truncate", "drop")
GENERATED = "generated"
GENERATED_SEED = 20251208


def _message_list(value, key: str) -> list:
    if isinstance(value, str):
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if isinstance(value, list):
        return value
    raise ValueError(f"field {key!r} must be a string or a list of messages")


def conversation(record) -> list[dict]:
    """One parsed .jsonl record -> its messages, checked (`tokenizer.check_messages`); ValueError if not."""
    if not isinstance(record, dict):
        raise ValueError("a line must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        messages = [*_message_list(record["prompt"], "prompt"),
                    *_message_list(record["completion"], "completion")]
    else:
        raise ValueError("expected a 'messages' list or 'prompt' and 'completion' fields")
    tok.check_messages(messages)
    return messages


def read_conversations(paths: list[str]) -> list[list[dict]]:
    """Every conversation of `paths` (.jsonl files, or `GENERATED`), in order.

    Raises ValueError "PATH:LINE: why" for invalid JSON or an invalid conversation."""
    conversations = []
    for path in paths:
        if path == GENERATED:
            conversations += generated_conversations()
            continue
        if not path.endswith(".jsonl"):
            raise ValueError(f"unsupported chat file {path} (expected .jsonl)")
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    conversations.append(conversation(json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
                except ValueError as e:
                    raise ValueError(f"{path}:{number}: {e}") from None
    return conversations


def generated_conversations(count: int = 4000, seed: int = GENERATED_SEED) -> list[list[dict]]:
    """`count` arithmetic conversations: an optional system turn, one or two questions "What is a + b?" /
    "And times c?" with 1- to 3-digit numbers, each answered with the number alone."""
    rng = np.random.default_rng(seed)
    conversations = []
    for _ in range(count):
        a, b, c = (int(x) for x in rng.integers(0, 1000, 3))
        messages = [{"role": "system", "content": "Answer with a number."}] if rng.random() < 0.5 else []
        messages += [{"role": "user", "content": f"What is {a} + {b}?"},
                     {"role": "assistant", "content": str(a + b)}]
        if rng.random() < 0.5:
            c = c % 10
            messages += [{"role": "user", "content": f"And times {c}?"},
                         {"role": "assistant", "content": str((a + b) * c)}]
        conversations.append(messages)
    return conversations


@dataclasses.dataclass(frozen=True)
class ChatCorpus:
    """Tokenised conversations that fit: `ids` / `trained` hold token ids [L] and the trained-token mask
    [L] of each kept conversation (L <= seq_len); the counts say what happened to the others."""

    ids: tuple[np.ndarray, ...]
    trained: tuple[np.ndarray, ...]
    total: int  # conversations read
    truncated: int  # longer than seq_len and cut to seq_len tokens
    dropped_long: int  # longer than seq_len and dropped (overflow="drop")
    dropped_untrained: int  # no trained target within the kept tokens

    def summary(self, overflow: str) -> str:
        """One line for the log."""
        return (f"chat data: {len(self.ids)} of {self.total} conversations kept; longer than seq_len: "
                f"{self.truncated + self.dropped_long} ({overflow}); dropped with no trained token left: "
                f"{self.dropped_untrained}")


@functools.lru_cache(maxsize=4)
def load_corpus(paths: tuple[str, ...], tokenizer_name: str, mask: str, seq_len: int, overflow: str,
                stamps: tuple = ()) -> ChatCorpus:
    """Read, check and tokenise `paths` once per setting (validation and the data streams share it;
    `stamps`, the files' modification times and sizes, make a changed file read again).

    A conversation of L > seq_len tokens is cut to its first seq_len tokens ("truncate": the last kept
    position still predicts the next real token) or dropped ("drop"); one whose targets are then all
    masked is dropped, so no row carries a conversation that trains nothing."""
    del stamps  # only part of the cache key
    if overflow not in OVERFLOWS:
        raise ValueError(f"data.chat.overflow={overflow!r} must be one of {', '.join(OVERFLOWS)}")
    if mask not in tok.CHAT_MASKS:
        raise ValueError(f"data.chat.mask={mask!r} must be one of {', '.join(tok.CHAT_MASKS)}")
    tokenizer = tok.load(tokenizer_name)
    ids, trained = [], []
    truncated = dropped_long = dropped_untrained = 0
    conversations = read_conversations(list(paths))
    for messages in conversations:
        x, m = tok.encode_chat_for_training(tokenizer, messages, mask=mask)
        if len(x) > seq_len:
            if overflow == "drop":
                dropped_long += 1
                continue
            truncated += 1
            x, m = x[:seq_len + 1], m[:seq_len + 1]  # the token after the cut is still a target
        if not m[1:].any():
            dropped_untrained += 1
            continue
        ids.append(x)
        trained.append(m)
    return ChatCorpus(tuple(ids), tuple(trained), len(conversations), truncated, dropped_long,
                      dropped_untrained)


def chat_example(ids: np.ndarray, trained: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Token ids [L] and trained-token mask [L] -> the packer's features [min(L, seq_len)]:
    next-token targets, loss where the target token is trained, no loss on the last token unless the
    conversation was truncated (then the token after the cut is its target)."""
    targets = np.append(ids[1:], 0).astype(np.int32)
    loss_mask = np.append(trained[1:], 0).astype(np.int32)
    return {"input_ids": ids[:seq_len], "targets": targets[:seq_len], "loss_mask": loss_mask[:seq_len],
            "answer_mask": np.zeros(min(len(ids), seq_len), np.int32)}


class Examples:
    """The examples (`chat_example`) of a ChatCorpus, as a random-access source."""

    def __init__(self, corpus: ChatCorpus, seq_len: int):
        self.corpus, self.seq_len = corpus, seq_len

    def __len__(self) -> int:
        return len(self.corpus.ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return chat_example(self.corpus.ids[index], self.corpus.trained[index], self.seq_len)
