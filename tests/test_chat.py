"""Chat SFT: ChatML rendering and trained-token masks (ouro_jax.tokenizer) against Hugging Face's, chat
jsonl reading, and chat data in the packed pipeline."""


import pytest

from ouro_jax import tokenizer as tk

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nEasy.\n</think>\n4"},
    {"role": "user", "content": "\n\nAnd 3 + 3 ?  "},
    {"role": "assistant", "content": "\n\n  6, of course.\n"},
    {"role": "user", "content": "日本語 😀"},
    {"role": "assistant", "content": " Sure: 日本語 😀 <|im_end|>"},
]


@pytest.fixture(scope="module")
def ouro():
    return tk.load()


@pytest.fixture(scope="module")
def hf(ouro, tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("hf_tokenizer")
    tk.save_hf_files(ouro, out)
    return AutoTokenizer.from_pretrained(out, local_files_only=True)


@pytest.mark.parametrize("messages", [TURNS, [SYSTEM, *TURNS], TURNS[:2], [SYSTEM, *TURNS[:4]]],
                         ids=["multi_turn", "system_multi_turn", "one_turn", "system_two_turns"])
def test_encode_chat_for_training_equals_hf_assistant_mask(ouro, hf, messages):
    ids, mask = tk.encode_chat_for_training(ouro, messages)
    theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                    return_assistant_tokens_mask=True)
    assert ids.tolist() == theirs["input_ids"]
    assert mask.tolist() == theirs["assistant_masks"]
    assert ids.tolist() == tk.encode_chat(ouro, messages, add_generation_prompt=False)


def test_mask_by_hand_on_bytes():
    """Byte-level: one token per character, so the trained positions are the assistant characters."""
    tokenizer = tk.load("bytes")
    messages = [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ab"},
                {"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>c</think>"}]
    ids, mask = tk.encode_chat_for_training(tokenizer, messages)
    pieces = [("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
               "<|im_start|>assistant\n", 0), ("ab<|im_end|>", 1),
              ("\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n", 0),
              ("<think>c</think><|im_end|>", 1),
              ("\n", 0)]
    expected = [flag for text, flag in pieces for _ in tokenizer.encode(text, add_special_tokens=False).ids]
    assert mask.tolist() == expected
    assert tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False) == (
        "ab<|im_end|><think>c</think><|im_end|>")
    _, last = tk.encode_chat_for_training(tokenizer, messages, mask="last_assistant")
    last_text = tokenizer.decode(ids[last == 1].tolist(), skip_special_tokens=False)
    assert last_text == "<think>c</think><|im_end|>"
    _, every = tk.encode_chat_for_training(tokenizer, messages, mask="all")
    assert every.all()


@pytest.mark.parametrize("messages, why", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "unknown role 'bot'"),
    ([{"role": "assistant"}], "'role' and 'content'"),
    ([], "non-empty list"),
])
def test_bad_conversations(ouro, messages, why):
    with pytest.raises(ValueError, match=why):
        tk.encode_chat_for_training(ouro, messages)
