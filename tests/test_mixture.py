"""Weighted data mixtures (ouro_jax.data.mixture): proportions, determinism, exact resume, process shards,
per-source counts, and the weights and components that are refused."""

import json

import numpy as np
import pytest

from ouro_jax.data import mixture, pipeline

S = 48


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mix") / "t.jsonl"
    rng = np.random.default_rng(0)
    path.write_text("".join(json.dumps({"text": "w" * int(rng.integers(5, 70))}) + "\n" for _ in range(50)))
    return str(path)


def mix_config(text_file, weights=(0.5, 0.3, 0.2), **overrides):
    return {"source": "mixture", "seq_len": S, "batch_size": 4, "tokenizer": "bytes", "eval_fraction": 0.1,
            "mixture": {
                "hops": {"weight": weights[0], "source": "phop", "phop": {"p": 2, "alphabet": 4}},
                "chat": {"weight": weights[1], "source": "chat", "chat": {"files": "generated"}},
                "text": {"weight": weights[2], "source": "text", "text": {"files": text_file}}},
            **overrides}


@pytest.mark.parametrize("count", [2_000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_proportions_within_one_percent(text_file, count):
    data = mix_config(text_file, mix_by="documents")  # a cheap second text source, not the task, for speed
    data["mixture"]["hops"] = {"weight": 0.5, "source": "text", "text": {"files": text_file}}
    docs, names = pipeline._mixture_examples(pipeline.resolve_config(data), seed=0, split=pipeline.TRAIN)
    assert names == ["chat", "hops", "text"]  # components in name order
    first = np.array([-docs[i][mixture.SOURCE_IDS][0] for i in range(count)])  # 1 + component
    observed = np.bincount(first, minlength=4)[1:] / len(first)
    np.testing.assert_allclose(observed, [0.3, 0.5, 0.2], atol=0.01)
    assert abs(np.mean(first[:500] == 2) - 0.5) < 0.01  # a prefix stays close too, not just the total


def test_mix_by_tokens_gives_token_shares(text_file):
    data = mix_config(text_file)
    data["mixture"]["hops"] = {"weight": 0.5, "source": "text", "text": {"files": text_file}}
    docs, _ = pipeline._mixture_examples(pipeline.resolve_config(data), seed=0, split=pipeline.TRAIN)
    ids = np.concatenate([docs[i][mixture.SOURCE_IDS] for i in range(2000)])
    shares = np.bincount(np.abs(ids), minlength=4)[1:] / len(ids)
    np.testing.assert_allclose(shares, [0.3, 0.5, 0.2], atol=0.03)  # mean lengths are estimated


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_deterministic_and_resume_is_bit_identical(text_file):
    data = mix_config(text_file, pack_bins=8)
    it = iter(pipeline.build_train_dataset(data, seed=3))
    _take(it, 3)
    state = it.get_state()
    json.dumps(state)
    rest = _take(it, 4)
    again = iter(pipeline.build_train_dataset(data, seed=3))
    again.set_state(state)
    for x, y in zip(rest, _take(again, 4), strict=True):
        assert x.keys() == y.keys() == {*pipeline.BATCH_KEYS, mixture.SOURCE_IDS}
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    fresh = _take(iter(pipeline.build_train_dataset(data, seed=3)), 7)
    for x, y in zip(fresh[3:], rest, strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    other = _take(iter(pipeline.build_train_dataset(data, seed=4)), 1)[0]
    assert not np.array_equal(other["input_ids"], fresh[0]["input_ids"])


def test_process_shards_split_the_documents(text_file):
    """Process k packs documents k, k + 2, ... of the one mixed stream."""
    cfg = pipeline.resolve_config(mix_config(text_file))
    docs, _ = pipeline._mixture_examples(cfg, seed=0, split=pipeline.TRAIN)
    firsts = [tuple(docs[i]["input_ids"].tolist()) for i in range(40)]
    for k in range(2):
        batches = _take(iter(pipeline.build_train_dataset(mix_config(text_file, batch_size=4), seed=0,
                                                          process_index=k, process_count=2)), 2)
        segments = {tuple(b["input_ids"][r][b["segment_ids"][r] == s].tolist())
                    for b in batches for r in range(2) for s in range(1, b["segment_ids"][r].max() + 1)}
        chunks = {d[i:i + S] for d in firsts[k::2] for i in range(0, len(d), S)}
        assert segments and segments <= chunks


def test_source_counter_counts_tokens_and_documents():
    counter = mixture.SourceCounter(["a", "b"], [4, None])
    ids = np.array([[-1, 1, 1, -2, 2, 0], [-2, 2, 2, 2, 0, 0]], np.int32)
    batch = {"input_ids": np.zeros_like(ids), mixture.SOURCE_IDS: ids}
    counter.add(batch)
    assert mixture.SOURCE_IDS not in batch
    assert counter.flush() == {"tokens/a": 3.0, "tokens/b": 6.0}
    assert counter.total_documents.tolist() == [1, 2]
    assert counter.flush() == {"tokens/a": 0.0, "tokens/b": 0.0}


def test_packed_source_ids_mark_every_token(text_file):
    batch = next(iter(pipeline.build_train_dataset(mix_config(text_file), seed=0)))
    ids = batch[mixture.SOURCE_IDS]
    np.testing.assert_array_equal(ids != 0, batch["segment_ids"] != 0)
    np.testing.assert_array_equal(ids < 0, (batch["positions"] == 0) & (batch["segment_ids"] != 0))


@pytest.mark.parametrize("weights, why", [
    ((0.0, 0.0, 0.0), "must sum to a positive number"),
    ((1.0, -0.5, 0.5), r"data\.mixture\.chat\.weight must be a finite number >= 0"),
    ((1.0, float("nan"), 0.5), r"data\.mixture\.chat\.weight must be a finite number >= 0"),
])
def test_bad_weights_are_refused_before_compiling(text_file, weights, why):
    from ouro_jax.train import config as config_lib
    from ouro_jax.train import recipes

    c = recipes.text("cpu")
    c.data = mix_config(text_file, weights)
    with pytest.raises(config_lib.ConfigError, match=why) as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value)


def test_bad_components(text_file):
    data = mix_config(text_file)
    data["mixture"]["text"]["text"]["files"] = "/nonexistent/*.jsonl"
    with pytest.raises(FileNotFoundError, match="no file matches"):
        pipeline.check_inputs(data, vocab_size=320)
    data = mix_config(text_file)
    data["mixture"]["hops"]["nope"] = 1
    with pytest.raises(ValueError, match=r"unknown config key data\.mixture\.hops\.nope"):
        pipeline.resolve_config(data)
    with pytest.raises(ValueError, match=r"needs data\.mixture"):
        pipeline.resolve_config({"source": "mixture"})


@pytest.mark.slow
def test_training_on_a_mixture_resumes_bit_identically_and_logs_tokens_per_source(text_file, tmp_path):
    """Train 8 steps straight, and 4 + 4 with a restart from the step-4 checkpoint: same metrics.jsonl,
    with tokens per source in every record and in the mixture's proportions."""
    from ouro_jax.train import loop, recipes

    def config():
        c = recipes.text("cpu")
        c.update_from_flattened_dict({
            "total_steps": 8, "log_every_steps": 1, "eval_every_steps": 0, "checkpoint_every_steps": 4,
            "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 1,
            "model.num_attention_heads": 2, "model.num_key_value_heads": 2, "model.head_dim": 16,
            "model.total_ut_steps": 2})
        c.data = pipeline.resolve_config(mix_config(text_file, mix_by="documents", batch_size=8))
        return c

    def records(workdir):
        lines = (tmp_path / workdir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    loop.train(config(), str(tmp_path / "straight"))
    c = config()
    c.total_steps = 4
    loop.train(c, str(tmp_path / "resumed"))
    loop.train(config(), str(tmp_path / "resumed"), allow_config_change=True)
    straight = records("straight")
    assert straight == records("resumed")
    names = {"tokens/chat", "tokens/hops", "tokens/text"}
    assert len(straight) == 8 and all(names <= r.keys() for r in straight)
    assert sum(r["tokens/hops"] for r in straight) > 0
