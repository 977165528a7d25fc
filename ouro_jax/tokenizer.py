"""The Ouro tokenizer (SmolLM2's byte-level BPE, 49152 tokens), ChatML helpers and small BPE training.

Ouro uses the SmolLM2 tokenizer unchanged: `<|endoftext|>` = 0, `<|im_start|>` = 1,
`<|im_end|>` = 2, then 14 more code/notebook control tokens (ids 3..16) and the BPE vocabulary. Digits are
always split into single tokens. Six ASCII control characters (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D) have no
token and are dropped when encoding, as with the original. A copy ships with the package
(`assets/ouro_tokenizer.json.gz`, provenance in `assets/OURO_TOKENIZER_LICENSE.md`): `load()` works offline.

Token ids and stopping (the released chat format): the released config.json sets bos = eos = pad = 0, but a
chat turn ends with `<|im_end|>` (2). Generation of a chat turn must stop at `<|im_end|>` (id 2) and at
`<|endoftext|>` (id 0), the document separator of pre-training text: `STOP_IDS`. The Thinking models write
their reasoning as plain text inside `<think>…</think>`; these tags are not special tokens in this
vocabulary (each takes three tokens).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT_ID = 0
IM_START_ID = 1
IM_END_ID = 2
STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)
"""Token ids that end generation of a chat turn: `<|im_end|>` first, then `<|endoftext|>`."""
VOCAB_SIZE = 49152
"""Size of the Ouro (SmolLM2) vocabulary, the released models' vocab_size."""

_BUNDLED = "ouro_tokenizer.json.gz"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Jinja ChatML template rendering exactly what `format_chat` returns (no default system prompt). Its
`{% generation %}` markers enclose each assistant turn's content and closing `<|im_end|>`, so Hugging Face's
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks the tokens `encode_chat_for_training`
trains by default."""

ROLES = ("system", "user", "assistant")
CHAT_MASKS = ("assistant", "last_assistant", "all", "user")
"""What `encode_chat_for_training` marks: every assistant turn's content and closing `<|im_end|>`
(default), only the last assistant turn's, every token, or every user turn's content and `<|im_end|>`
(to measure the loss on what an assistant-only fine-tune leaves untrained)."""


def load(name_or_path: str = "ouro") -> Tokenizer:
    """Load a tokenizer.

    Args:
      name_or_path: "ouro" for the bundled Ouro/SmolLM2 tokenizer; "bytes" for a byte-level tokenizer
        without merges (the three ChatML tokens, then the 256 bytes: 259 ids, for tiny CPU models);
        otherwise a tokenizer.json file (plain or gzipped, by a ".gz" suffix) or a directory containing
        tokenizer.json (e.g. a Hugging Face checkpoint directory).

    Raises:
      FileNotFoundError: nothing loadable at the path.
      ValueError: the file is not a valid tokenizer.json.
    """
    if name_or_path == "ouro":
        data = (resources.files("ouro_jax.assets") / _BUNDLED).read_bytes()
        return Tokenizer.from_str(gzip.decompress(data).decode("utf-8"))
    if name_or_path == "bytes":
        return byte_tokenizer()
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}: expected 'ouro', a tokenizer.json(.gz) file or a directory with one")
    try:
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
        return Tokenizer.from_str(text)
    except Exception as err:  # gzip, unicode and tokenizers parse errors alike
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a valid tokenizer.json: {reason}") from err


def format_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Render messages as ChatML, the format of Ouro's chat and Thinking models.

    Each message {"role": r, "content": c} becomes "<|im_start|>r\\nc<|im_end|>\\n"; with
    `add_generation_prompt` the prompt for the reply, "<|im_start|>assistant\\n", follows. No system
    prompt is added. Special-token strings inside a content are not escaped.
    """
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict],
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `format_chat(messages, add_generation_prompt)`; the ChatML markers become ids 1 and 2."""
    return tokenizer.encode(format_chat(messages, add_generation_prompt), add_special_tokens=False).ids


def check_messages(messages) -> None:
    """Raise ValueError (one line) unless `messages` is a conversation `encode_chat_for_training` can train
    on: a non-empty list of {"role", "content"} dicts with roles in `ROLES`, string contents, and at least
    one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn (nothing to train on)")


def render_chat_for_training(messages: Sequence[dict], role: str = "assistant"
                             ) -> tuple[str, list[tuple[int, int]]]:
    """`format_chat(messages, add_generation_prompt=False)` and the character spans [start, end) of each
    `role` turn's content plus its `<|im_end|>` (for assistant turns the template's `{% generation %}`
    blocks), in order."""
    text, spans = "", []
    for m in messages:
        text += f"{IM_START}{m['role']}\n"
        if m["role"] == role:
            spans.append((len(text), len(text) + len(m["content"]) + len(IM_END)))
        text += f"{m['content']}{IM_END}\n"
    return text, spans


def encode_chat_for_training(tokenizer: Tokenizer, messages: Sequence[dict], mask: str = "assistant"
                             ) -> tuple[np.ndarray, np.ndarray]:
    """A conversation -> (token ids [L] int32, trained-token mask [L] int32) for supervised fine-tuning.

    The ids are `encode_chat(tokenizer, messages, add_generation_prompt=False)`. `mask` (`CHAT_MASKS`):
    "assistant" marks every assistant turn's content and its closing `<|im_end|>` (not the
    `<|im_start|>assistant\\n` header, not system or user turns; `<think>...</think>` is content);
    "last_assistant" only the last assistant turn's; "all" every token; "user" every user turn's
    content and `<|im_end|>` (never trained by default: for evaluation). A token is marked when it holds
    any character of a marked span, the rule of Hugging Face's `return_assistant_tokens_mask`, so with
    the default the pair equals what `apply_chat_template(messages, tokenize=True, return_dict=True,
    return_assistant_tokens_mask=True)` of a tokenizer written by `save_hf_files` returns. mask[i] says
    whether token i is a target (a trainer predicts it from tokens < i).

    Raises:
      ValueError: an invalid conversation (`check_messages`) or an unknown `mask`.
    """
    if mask not in CHAT_MASKS:
        raise ValueError(f"chat mask {mask!r} must be one of {', '.join(CHAT_MASKS)}")
    check_messages(messages)
    text, spans = render_chat_for_training(messages, "user" if mask == "user" else "assistant")
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids = np.array(encoding.ids, np.int32)
    if mask == "all":
        return ids, np.ones_like(ids)
    trained = np.zeros_like(ids)
    for start, end in spans[-1:] if mask == "last_assistant" else spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None:  # as Hugging Face does: a span whose first character has no token ends the mask
            break
        trained[first:len(ids) if last is None else last + 1] = 1
    return ids, trained


def _set_byte_level_pipeline(tokenizer: Tokenizer) -> None:
    """Give `tokenizer` SmolLM2's pipeline: digits split singly, then GPT-2 byte-level; byte-level decode."""
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()


def byte_tokenizer(special_tokens: Sequence[str] = (ENDOFTEXT, IM_START, IM_END)) -> Tokenizer:
    """Byte-level tokenizer with no merges: `special_tokens` get ids 0, 1, ..., then the 256 byte symbols."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*special_tokens, *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    _set_byte_level_pipeline(tokenizer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = (ENDOFTEXT, IM_START, IM_END)) -> Tokenizer:
    """Train a byte-level BPE tokenizer with Ouro's pre-tokenization, for corpora too small for 49152 tokens.

    The special tokens get ids 0, 1, 2, ... in the given order, then the 256 byte symbols, then merges.

    Raises:
      ValueError: `vocab_size` leaves no room for merges, or the corpus yields fewer than `vocab_size` tokens.
    """
    minimum = len(special_tokens) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size {vocab_size} must exceed {minimum} (special tokens + 256 bytes)")
    tokenizer = Tokenizer(models.BPE())
    _set_byte_level_pipeline(tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the corpus yields only {tokenizer.get_vocab_size()} tokens, fewer than vocab_size {vocab_size}")
    return tokenizer


def save_hf_files(tokenizer: Tokenizer, out_dir: str | Path, *, chat_template: bool = True) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for `transformers`.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` then loads offline, encodes exactly as
    `tokenizer`, and (with `chat_template`) its `apply_chat_template` renders `format_chat`.

    Special tokens of the released chat format (not the released config's all-zero ids):
      eos = "<|im_end|>" (2): ends every chat turn, so generation stops there.
      bos = "<|im_start|>" (1): starts every ChatML turn; never prepended automatically.
      pad = "<|endoftext|>" (0): not the eos, so masking padding by id never masks a real end of turn.
      unk = "<|endoftext|>" (0): as in SmolLM2; a byte-level BPE never produces it.
    `tokenizer` must contain the three ChatML tokens (the Ouro tokenizer and `train_bpe`'s do).
    """
    missing = [t for t in (ENDOFTEXT, IM_START, IM_END) if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    special = {"bos_token": IM_START, "eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 65536,
    }
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
