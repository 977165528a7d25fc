"""Chat SFT: ChatML rendering and trained-token masks (ouro_jax.tokenizer) against Hugging Face's, chat
jsonl reading, and chat data in the packed pipeline."""

import collections
import json

import numpy as np
import pytest

from ouro_jax import tokenizer as tk
from ouro_jax.data import pipeline

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
    _, user = tk.encode_chat_for_training(tokenizer, messages, mask="user")
    assert tokenizer.decode(ids[user == 1].tolist(), skip_special_tokens=False) == "hi<|im_end|>x<|im_end|>"


@pytest.mark.parametrize("messages, why", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "unknown role 'bot'"),
    ([{"role": "assistant"}], "'role' and 'content'"),
    ([], "non-empty list"),
])
def test_bad_conversations(ouro, messages, why):
    with pytest.raises(ValueError, match=why):
        tk.encode_chat_for_training(ouro, messages)


# Chat data in the pipeline ----------------------------------------------------------------------------

S = 96


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    root = tmp_path_factory.mktemp("chats")
    rng = np.random.default_rng(0)
    conversations = []
    for i in range(40):
        turns = [SYSTEM] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            turns += [{"role": "user", "content": f"q{rng.integers(1000)}"},
                      {"role": "assistant", "content": "a" * int(rng.integers(1, 9))}]
        conversations.append(turns)
    messages = _write_jsonl(root / "m.jsonl", [{"messages": c} for c in conversations[:30]])
    pairs = _write_jsonl(root / "p.jsonl", [{"prompt": c[-2]["content"], "completion": c[-1]["content"]}
                                            for c in conversations[30:]])
    as_pairs = [c[-2:] for c in conversations[30:]]
    return {"files": [messages, pairs], "conversations": conversations[:30] + as_pairs}


def chat_config(files, **overrides):
    data = {"source": "chat", "seq_len": S, "batch_size": 4, "tokenizer": "bytes", "num_epochs": 1,
            "eval_fraction": 0.0, "chat": {"files": files}}
    return {**data, **overrides}


def _segments(batches):
    """Every packed segment as (input_ids, targets, loss_mask) tuples; checks positions restart."""
    found = collections.Counter()
    for b in batches:
        for row in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][row]
            assert not b["loss_mask"][row][seg == 0].any()
            for k in range(1, seg.max() + 1):
                at = seg == k
                np.testing.assert_array_equal(b["positions"][row][at], np.arange(at.sum()))
                keys = ("input_ids", "targets", "loss_mask")
                found[tuple(tuple(b[key][row][at].tolist()) for key in keys)] += 1
    return found


def test_chat_packing_carries_the_assistant_mask(chats):
    tokenizer = tk.load("bytes")
    batches = list(pipeline.build_train_dataset(chat_config(chats["files"]), seed=0))
    want = collections.Counter()
    for messages in chats["conversations"]:
        text = tk.format_chat(messages, add_generation_prompt=False)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        # the target at i is token i + 1; it is trained when it lies in an assistant span (by hand:
        # byte-level, one token per character outside the ChatML markers)
        trained = [0] * len(ids)
        pos = 0
        for m in messages:
            header = len(tokenizer.encode(f"<|im_start|>{m['role']}\n").ids)
            body = len(tokenizer.encode(m["content"], add_special_tokens=False).ids) + 1
            if m["role"] == "assistant":
                trained[pos + header:pos + header + body] = [1] * body
            pos += header + body + 1
        assert pos == len(ids)
        want[(tuple(ids), tuple([*ids[1:], 0]), tuple([*trained[1:], 0]))] += 1
    assert _segments(batches) == want
    assert sum(b["segment_ids"].max(axis=1).sum() for b in batches) == len(chats["conversations"])


def test_overflow_truncate_and_drop_counts(tmp_path):
    long = [{"role": "user", "content": "x" * (S - 20)}, {"role": "assistant", "content": "y" * 30}]
    masked_out = [{"role": "user", "content": "x" * (S + 5)}, {"role": "assistant", "content": "y"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = _write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in (long, masked_out, short, short)])
    cfg = pipeline.resolve_config(chat_config(path))
    corpus = pipeline.chat_corpus(cfg)
    assert (corpus.total, corpus.truncated, corpus.dropped_long, corpus.dropped_untrained) == (4, 2, 0, 1)
    # by hand, byte-level: "<|im_start|>user\\n" is 6 tokens, "<|im_start|>assistant\\n" 11, so the long
    # conversation's assistant content starts at token 6 + 76 + 2 + 11 = 95; the cut keeps tokens 0..S
    assert [len(x) for x in corpus.ids] == [S + 1, 25, 25]  # the token after the cut stays a target
    rows = list(pipeline.build_train_dataset(chat_config(path), seed=0))
    assert sum(int(b["loss_mask"].sum()) for b in rows) == 2 + 3 + 3  # "yy" | "yo<|im_end|>" twice
    assert "3 of 4 conversations kept; longer than seq_len: 2 (truncate); dropped with no trained token " \
           "left: 1" in corpus.summary("truncate")
    dropped = pipeline.chat_corpus(pipeline.resolve_config(chat_config(path, chat={"files": path,
                                                                                   "overflow": "drop"})))
    assert (dropped.total, dropped.truncated, dropped.dropped_long, dropped.dropped_untrained) == (4, 0, 2, 0)


@pytest.mark.slow
def test_masked_targets_change_no_gradient(chats):
    """Oracle: replacing the target of every untrained position (user, system, headers, padding) by another
    token leaves the gradient bit-identical; replacing one trained target changes it."""
    import jax
    from flax import nnx

    from ouro_jax import Ouro, objective
    from ouro_jax.model import config as cfgs

    batch = next(iter(pipeline.build_train_dataset(chat_config(chats["files"]), seed=0)))
    mask = batch["loss_mask"].astype(bool)
    assert mask.any() and (~mask).any()
    model = Ouro(cfgs.tiny(vocab_size=320, num_hidden_layers=1, total_ut_steps=2, scan_layers=False),
                 rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    grad = jax.jit(jax.grad(lambda p, b: objective.stage1_loss(nnx.merge(graphdef, p), b, beta=0.1)[0]))

    def changed(where):
        targets = batch["targets"].copy()
        targets[where] = (targets[where] + 7) % 259
        return {**batch, "targets": targets}

    base = jax.tree.leaves(grad(params, batch))
    for leaf, other in zip(base, jax.tree.leaves(grad(params, changed(~mask))), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other))
    one = np.zeros_like(mask)
    one[np.argwhere(mask)[0][0], np.argwhere(mask)[0][1]] = True
    moved = jax.tree.leaves(grad(params, changed(one)))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, moved, strict=True))


@pytest.mark.parametrize("line, why", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
     "unknown role 'robot'"),
    ('{"messages": [', "invalid JSON"),
    ({"prompt": "only a prompt"}, "'prompt' and 'completion'"),
])
def test_bad_chat_file_is_one_line_naming_file_and_line(tmp_path, line, why):
    from ouro_jax.train import config as config_lib
    from ouro_jax.train import recipes

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, good, line])
    c = recipes.text("cpu")
    c.data.update(source="chat")
    c.data.chat.files = path
    with pytest.raises(config_lib.ConfigError, match=f"bad.jsonl:3: .*{why}") as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value)
    c.data.chat.files = str(tmp_path / "missing.jsonl")
    with pytest.raises(config_lib.ConfigError, match=r"data\.chat\.files: no file matches .*missing\.jsonl"):
        config_lib.validate(c)


def test_evaluate_data_scores_assistant_tokens_only(chats, tmp_path):
    from ouro_jax.evaluate import data

    tokenizer = tk.load("bytes")
    want = sum(int(tk.encode_chat_for_training(tokenizer, m)[1][1:].sum()) for m in chats["conversations"])
    batches, description = data.load(chats["files"][0] + "," + chats["files"][1], model_path="unused",
                                     model_kind="run", vocab_size=320, tokenizer="bytes", batch_size=4,
                                     seq_len=S)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == want
    assert "40 of 40 conversations kept" in description
    user = sum(int(tk.encode_chat_for_training(tokenizer, m, mask="user")[1][1:].sum())
               for m in chats["conversations"])
    batches, description = data.load(chats["files"][0] + "," + chats["files"][1], model_path="unused",
                                     model_kind="run", vocab_size=320, tokenizer="bytes", batch_size=4,
                                     seq_len=S, chat_mask="user")
    assert description.startswith("user tokens of")
    assert sum(int(b["loss_mask"].sum()) for b in batches) == user > 0
    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": "not a conversation"}])
    assert not data.is_chat(text) and data.is_chat(chats["files"][1])


def test_reply_prompts_end_at_the_last_assistant_turn():
    from ouro_jax.evaluate import replies

    tokenizer = tk.load("bytes")
    conversation = [SYSTEM, *TURNS[:4]]
    (prompt,), (reference,) = replies.prompts_and_references(tokenizer, [conversation])
    assert reference == TURNS[3]["content"]
    assert tokenizer.decode(prompt, skip_special_tokens=False) == tk.format_chat(conversation[:4])
