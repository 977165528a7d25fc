"""ouro_jax.data.tasks: mixed p-hop, n-ary addition, i-GSM-style graphs and the facts table, each checked
against an independent path (string arithmetic, a slow hop routine, a fixed-point graph evaluator), plus
determinism by index, difficulty mixing and their pipeline registration."""

import collections

import numpy as np
import pytest

from ouro_jax.data import BATCH_KEYS, build_eval_batches, build_train_dataset
from ouro_jax.data.tasks import Addition, Facts, ModularGraph, PHop, fact_table

from oracle import slow_phop_target


def assert_examples_by_index(task, indices):
    """batch(indices) row r equals task[indices[r]], and a second instance gives the same examples."""
    batch = task.batch(indices)
    twin = type(task)(**{f: getattr(task, f) for f in task.__dataclass_fields__})
    for row, i in enumerate(indices):
        single = twin[i]
        assert set(single) == set(BATCH_KEYS)
        for key in BATCH_KEYS:
            assert single[key].dtype == np.int32 and single[key].shape == (task.n,)
            np.testing.assert_array_equal(batch[key][row], single[key], err_msg=key)
    return batch


def real_tokens(example):
    return example["input_ids"][example["segment_ids"] == 1].tolist()


# p-hop with mixed difficulty --------------------------------------------------------------------------


def test_mixed_phop_matches_slow_reference_and_mixes_uniformly():
    task = PHop(n=32, p=4, p_min=1, alphabet=4, seed=3)
    assert task.vocab_size == 8
    batch = assert_examples_by_index(task, [0, 17, 5, 2**31 - 1, 17])
    hops = collections.Counter()
    for i in range(300):
        ex = task[i]
        h = int(ex["input_ids"][0]) - 4 + 1  # the hop-count token
        assert 1 <= h <= 4
        hops[h] += 1
        x = ex["input_ids"][1:]
        assert x.max() < 4 and np.all(x[1:] != x[:-1])
        assert ex["loss_mask"][0] == 0 and ex["answer_mask"].tolist() == [0] * 31 + [1]
        for i_pos in range(31):
            want = slow_phop_target(x.tolist(), i_pos, h)
            assert ex["loss_mask"][1 + i_pos] == (want is not None)
            assert ex["targets"][1 + i_pos] == (0 if want is None else want)
        assert ex["loss_mask"][-1] == 1  # every example has a full chain at its last position
    assert set(hops) == {1, 2, 3, 4} and min(hops.values()) > 50  # about 75 each
    assert not np.array_equal(batch["input_ids"][0], PHop(n=32, p=4, p_min=1, seed=4)[0]["input_ids"])


def test_fixed_phop_has_no_hop_token():
    fixed = PHop(n=16, p=2, seed=1)
    assert fixed.vocab_size == 4 and fixed[0]["input_ids"].max() < 4 and fixed[0]["loss_mask"][0] == 0
    single = PHop(n=16, p=2, p_min=2, seed=1)[0]  # a "mix" of one hop count still carries the token
    assert single["input_ids"][0] == 4 + 2 - 1
    with pytest.raises(ValueError, match="p_min <= p"):
        PHop(n=16, p=2, p_min=3)


# n-ary addition ---------------------------------------------------------------------------------------


def decode_addition(example):
    """The example's text "a+b+...=s" from its tokens (0-9 digits, 10 '+', 11 '=')."""
    return "".join("0123456789+="[t] for t in real_tokens(example))


def test_addition_answers_by_integer_arithmetic_and_term_mixing():
    task = Addition(n=32, terms=8, terms_min=2, digits=2, seed=0)
    assert task.answer_digits == 3 and task.vocab_size == 12
    assert_examples_by_index(task, [4, 1, 4, 999])
    counts = collections.Counter()
    for i in range(400):
        ex = task[i]
        text = decode_addition(ex)
        left, right = text.split("=")
        operands = left.split("+")
        assert all(len(a) == 2 for a in operands) and len(right) == 3
        assert int(right) == sum(int(a) for a in operands)
        counts[len(operands)] += 1
        # the loss covers exactly the positions that predict a sum digit, and the target is that digit
        mask = ex["loss_mask"].astype(bool)
        np.testing.assert_array_equal(ex["answer_mask"], ex["loss_mask"])
        assert "".join(map(str, ex["targets"][mask])) == right
        assert ex["input_ids"][mask][0] == task.equals and ex["input_ids"][-1] == int(right[-1])
        real = ex["segment_ids"] == 1
        assert real[-1] and np.all(np.diff(real.astype(int)) >= 0)  # left-padded
        np.testing.assert_array_equal(ex["positions"][real], np.arange(real.sum()))
        assert not ex["loss_mask"][~real].any() and not ex["input_ids"][~real].any()
    assert set(counts) == set(range(2, 9)) and min(counts.values()) > 30  # about 57 each
    fixed = Addition(n=27, terms=8, digits=2)
    assert all(decode_addition(fixed[i]).count("+") == 7 for i in range(20))
    with pytest.raises(ValueError, match=r"needs data\.seq_len >= 27"):
        Addition(n=26, terms=8, digits=2)


def test_addition_column_tokens_name_each_digit_column_and_keep_the_problem():
    plain = Addition(n=32, terms=4, terms_min=2, digits=3, seed=5)
    tagged = Addition(n=32, terms=4, terms_min=2, digits=3, seed=5, column_tokens=True)
    assert (tagged.plus, tagged.equals, tagged.vocab_size) == (40, 41, 42)
    for i in range(50):
        a, b = plain[i], tagged[i]
        for key in ("loss_mask", "answer_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(a[key], b[key])
        ids = real_tokens(b)
        equals = list(ids).index(tagged.equals)
        operands = " ".join(map(str, ids[:equals])).split(f" {tagged.plus} ")
        for operand in operands:  # columns hundreds, tens, units: tokens 30-39, 20-29, 10-19
            assert [int(t) // 10 for t in operand.split()] == [3, 2, 1]
        symbols = {tagged.plus: 10, tagged.equals: 11}
        mapped = [t % 10 if t < tagged.plus else symbols[t] for t in ids[:equals + 1]]
        assert mapped + list(ids[equals + 1:]) == list(real_tokens(a))
        assert all(t < 10 for t in ids[equals + 1:])  # the sum's digits stay 0-9
        np.testing.assert_array_equal(b["targets"][b["loss_mask"].astype(bool)],
                                      a["targets"][a["loss_mask"].astype(bool)])


# i-GSM-style modular graphs ---------------------------------------------------------------------------


def parse_graph(task, example):
    """(statements {name: (args...)}, queries [names], query targets) from the tokens."""
    tokens = real_tokens(example)
    query = tokens.index(task.token("?"))
    body, names = tokens[:query], tokens[query + 1:]
    statements, k = {}, 0
    while k < len(body):
        name, assign = body[k], body[k + 1]
        assert assign == task.token("=") and name >= task.modulus + 5
        if k + 3 < len(body) and body[k + 3] in (task.token("+"), task.token("-"), task.token("*")):
            statements[name] = tuple(body[k + 2:k + 5])
            k += 5
        else:
            statements[name] = (body[k + 2],)
            k += 3
    mask = example["loss_mask"][example["segment_ids"] == 1].astype(bool)
    targets = example["targets"][example["segment_ids"] == 1][mask]
    return statements, names, targets.tolist()


def evaluate_graph(task, statements):
    """Values by repeated sweeps until nothing changes (independent of the generator's level order),
    and each variable's depth (operations on its longest chain)."""
    value, depth = {}, {}
    ops = {task.token("+"): lambda a, b: a + b, task.token("-"): lambda a, b: a - b,
           task.token("*"): lambda a, b: a * b}
    while len(value) < len(statements):
        for name, args in statements.items():
            if name in value:
                continue
            if len(args) == 1:
                value[name], depth[name] = args[0], 0
            elif args[0] in value and args[2] in value:
                value[name] = ops[args[1]](value[args[0]], value[args[2]]) % task.modulus
                depth[name] = 1 + max(depth[args[0]], depth[args[2]])
    return value, depth


def test_igsm_answers_by_independent_evaluation():
    task = ModularGraph(n=48, variables=8, depth=3, modulus=7, names=16, seed=2)
    assert task.length == 45 and task.vocab_size == 28
    assert_examples_by_index(task, [3, 0, 3, 123456])
    first_is_constant, answers = [], collections.Counter()
    for i in range(300):
        ex = task[i]
        statements, names, targets = parse_graph(task, ex)
        assert len(statements) == 8 and sorted(names) == sorted(statements)  # every variable queried once
        value, depth = evaluate_graph(task, statements)
        assert targets == [value[n] for n in names]
        assert depth[names[-1]] == 3 == max(depth.values())  # the question is a deepest variable
        assert sorted(collections.Counter(depth.values()).values()) == [2, 2, 2, 2]
        assert ex["answer_mask"][-1] == 1 and ex["answer_mask"].sum() == 1
        assert ex["targets"][-1] == value[names[-1]]
        first_is_constant.append(len(next(iter(statements.values()))) == 1)
        answers[value[names[-1]]] += 1
    assert 0.1 < np.mean(first_is_constant) < 0.5  # statements shuffled (2 of 8 are constants)
    assert len(answers) == 7


# knowledge-capacity facts ------------------------------------------------------------------------------


def test_facts_table_fixed_by_world_and_enumerated_by_the_heldout_stream():
    kw = dict(first_names=4, last_names=3, attributes=2, values=16)
    train, other_seed = Facts(n=32, seed=0, **kw), Facts(n=33, seed=5, **kw)
    table = fact_table(0, 12, 2, 16)
    assert train.num_facts == 24 and train.vocab_size == 16 + 2 + 4 + 3
    assert_examples_by_index(train, [0, 9, 0])
    for task in (train, other_seed, Facts(n=32, stream=1, **kw)):
        for i in range(20):
            ex = task[i]
            start = task.n - 4 * task.facts_per_row
            quads = ex["input_ids"][start:].reshape(-1, 4)
            first, last = quads[:, 0] - 18, quads[:, 1] - 22
            attribute = quads[:, 2] - 16
            np.testing.assert_array_equal(quads[:, 3], table[first * 3 + last, attribute])
            np.testing.assert_array_equal(ex["targets"][start + 2::4], quads[:, 3])
            assert ex["loss_mask"].sum() == task.facts_per_row == ex["answer_mask"].sum()
            assert not ex["segment_ids"][:start].any() and ex["positions"][start] == 0
    heldout = Facts(n=32, stream=1, **kw).batch(np.arange(3))  # 3 rows x 8 facts = every fact once
    ids = (heldout["input_ids"][:, 0::4] - 18) * 3 + heldout["input_ids"][:, 1::4] - 22
    facts = ids * 2 + heldout["input_ids"][:, 2::4] - 16
    assert sorted(facts.ravel().tolist()) == list(range(24))
    assert not np.array_equal(fact_table(1, 12, 2, 16), table)


# pipeline registration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source,settings,seq_len", [
    ("addition", {"terms": 4, "terms_min": 2}, 16), ("igsm", {"variables": 6, "depth": 2}, 40),
    ("facts", {"first_names": 4, "last_names": 4}, 16), ("phop", {"p": 3, "p_min": 1}, 24)])
def test_tasks_are_pipeline_sources(source, settings, seq_len):
    data = {"source": source, "seq_len": seq_len, "batch_size": 4, source: settings}
    first = [b for _, b in zip(range(2), build_train_dataset(data, seed=1), strict=False)]
    again = [b for _, b in zip(range(2), build_train_dataset(data, seed=1), strict=False)]
    for a, b in zip(first, again, strict=True):
        for key in BATCH_KEYS:
            assert a[key].shape == (4, seq_len)
            np.testing.assert_array_equal(a[key], b[key])
    held = build_eval_batches(data, seed=1, num_batches=1)[0]
    assert held["answer_mask"].any(axis=1).all()


def test_task_settings_errors():
    with pytest.raises(ValueError, match=r"unknown config key data\.addition\.operands"):
        build_train_dataset({"source": "addition", "addition": {"operands": 3}}, seed=0)
    with pytest.raises(ValueError, match=r"needs data\.seq_len >= 45"):
        build_train_dataset({"source": "igsm", "seq_len": 32}, seed=0)
