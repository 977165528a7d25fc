"""The bundled Ouro tokenizer, ChatML helpers, HF export and small BPE training (ouro_jax.tokenizer)."""

import gzip

import pytest

from ouro_jax import tokenizer as tk

TEXTS = [
    "Hello, world!",
    "  two leading spaces and trailing tab\t",
    "line\nbreaks\n\n\nand CRLF\r\n",
    "I'm sure they're fine; it'll do.",
    "In 2024, 12,345 people paid $3.14 (≈ 1e-3).",
    "def f(x):\n    return x ** 2  # square\n",
    '{"key": [1, 2.5, null]}',
    "日本語のテキスト。中文文本。한국어. Русский текст.",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦, e\u0301 vs é, nbsp\u00a0here",
    "<|im_start|>user\nHi<|im_end|>\n<think>\nhmm\n</think>\n\n4<|endoftext|>",
    "",
]

MESSAGES = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nEasy.\n</think>\n4"},
]


@pytest.fixture(scope="module")
def ouro():
    return tk.load()


def test_bundled_vocab_and_special_ids(ouro):
    assert ouro.get_vocab_size() == 49152
    assert [ouro.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tk.ENDOFTEXT_ID, tk.IM_START_ID, tk.IM_END_ID) == tuple(
        ouro.token_to_id(t) for t in (tk.ENDOFTEXT, tk.IM_START, tk.IM_END))
    assert tk.STOP_IDS == (2, 0)


@pytest.mark.parametrize("token, token_id", [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2),
                                             ("<file_sep>", 5), ("<empty_output>", 16)])
def test_special_tokens_encode_to_single_ids(ouro, token, token_id):
    assert ouro.encode(token).ids == [token_id]
    assert ouro.encode(f"a{token}b").ids[1] == token_id


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(ouro, text):
    assert ouro.decode(ouro.encode(text).ids, skip_special_tokens=False) == text


def test_known_encodings(ouro):
    ids = ouro.encode("<|im_start|>user\n").ids
    assert ids[0] == 1 and len(ids) == 3 and ouro.id_to_token(ids[2]) == "Ċ"
    for word in (" the", " hello", " world", " people"):
        assert ouro.encode(word).tokens == ["Ġ" + word[1:]]
    assert ouro.encode("2024").tokens == ["2", "0", "2", "4"]  # digits are single tokens
    assert ouro.encode("\n\n1.").tokens == ["ĊĊ", "1", "."]  # split before the digit, then "\n\n" merges
    assert ouro.encode("x =  42").tokens == ["x", "Ġ=", "ĠĠ", "4", "2"]
    assert ouro.encode("<think>").tokens == ["<", "think", ">"]  # not a special token in this vocabulary
    assert ouro.decode(ouro.encode("a\x04b\x06c").ids) == "abc"  # bytes without a token are dropped


def test_format_chat_exact():
    assert tk.format_chat(MESSAGES) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nEasy.\n</think>\n4<|im_end|>\n"
        "<|im_start|>assistant\n")
    user_turn = tk.format_chat(MESSAGES[:1], add_generation_prompt=False)
    assert user_turn == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"


def test_encode_chat(ouro):
    ids = tk.encode_chat(ouro, MESSAGES)
    assert ids == ouro.encode(tk.format_chat(MESSAGES)).ids
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert ouro.decode(ids[1:ids.index(2)]) == "user\nWhat is 2+2?"
    assert ids[-4:] == [1, *ouro.encode("assistant\n").ids]
    assert tk.encode_chat(ouro, MESSAGES, add_generation_prompt=False)[-2:] == [2, ouro.token_to_id("Ċ")]


@pytest.mark.torch
def test_save_hf_files_loads_in_transformers(ouro, tmp_path):
    from transformers import AutoTokenizer

    tk.save_hf_files(ouro, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    for text in TEXTS:
        assert hf.encode(text) == ouro.encode(text).ids, text
        assert hf(text)["input_ids"] == ouro.encode(text).ids, text
    for prompt in (True, False):
        rendered = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
        assert rendered == tk.format_chat(MESSAGES, add_generation_prompt=prompt)
    assert tk.load(str(tmp_path)).encode(TEXTS[4]).ids == ouro.encode(TEXTS[4]).ids


def test_save_hf_files_without_template(tmp_path):
    import json

    tokenizer = tk.train_bpe(["some text to train on, twice. some text to train on."] * 4, vocab_size=270)
    tk.save_hf_files(tokenizer, tmp_path, chat_template=False)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and config["eos_token"] == "<|im_end|>"
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["pad_token"] == "<|endoftext|>"


CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light. 1:3",
] * 20


def test_train_bpe(tmp_path):
    tokenizer = tk.train_bpe(CORPUS, vocab_size=320)
    assert tokenizer.get_vocab_size() == 320
    assert [tokenizer.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.token_to_id("Ġthe") is not None  # a frequent word was merged
    for text in [*CORPUS[:3], *TEXTS]:
        ids = tokenizer.encode(text).ids
        assert max(ids, default=0) < 320
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("<|im_start|>the<|im_end|>").ids[0] == 1
    path = tmp_path / "small.json.gz"
    path.write_bytes(gzip.compress(tokenizer.to_str().encode()))
    assert tk.load(str(path)).encode(CORPUS[0]).ids == tokenizer.encode(CORPUS[0]).ids


def test_train_bpe_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="must exceed 259"):
        tk.train_bpe(CORPUS, vocab_size=259)
    with pytest.raises(ValueError, match="fewer than vocab_size 100000"):
        tk.train_bpe(CORPUS, vocab_size=100_000)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        tk.load(str(missing))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        tk.load(str(tmp_path))  # a directory without tokenizer.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)) as err:
        tk.load(str(bad))
    assert "\n" not in str(err.value)
