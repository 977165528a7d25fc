"""ouro_jax.inference.Engine: continuous batching gives `generate`'s tokens, exit loops and log-probabilities
whatever else is in the batch, frees a finished row's slot at once, and rejects bad requests."""

import numpy as np
import pytest
from test_generate import NEW, ROWS, _full_forward_logits, _logprob64, _model

from ouro_jax.inference import Engine, SamplingParams, generate, left_pad

Q = 0.3  # tokens of the test model exit after loops 1, 2 and 3 at this q (test_generate.py)


@pytest.fixture(scope="module")
def model():
    return _model()


def run(engine, requests, arrive_at=None):
    """Drive `engine` until idle; request j (prompt, SamplingParams) is added before step arrive_at[j]
    (default 0). Returns, per request, its events as (tokens, exit_loops, logprobs, finish_reason,
    exit_logprobs)."""
    arrive_at = arrive_at or [0] * len(requests)
    ids, events, steps = {}, {}, 0
    while len(ids) < len(requests) or engine.has_work():
        for j, (prompt, params) in enumerate(requests):
            if arrive_at[j] == steps:
                ids[engine.add_request(prompt, params)] = j
        for e in engine.step():
            events.setdefault(ids[e.request_id], []).append(e)
        steps += 1
        assert steps < 200
    return [(np.array([e.token for e in events[j]]), np.array([e.exit_loop for e in events[j]]),
             np.array([e.logprob for e in events[j]], np.float32), events[j][-1].finish_reason,
             np.array([e.exit_logprob for e in events[j]], np.float32))
            for j in range(len(requests))]


def assert_matches_generate(model, got, max_tokens, settings, rows=(0, 1, 2)):
    """Request j (prompt ROWS[rows[j]]) has `generate`'s tokens and exit loops for its prompt (the first
    max_tokens[j] of them) and its token and exit log-probabilities to float32 rounding."""
    ids, lengths = left_pad(ROWS)
    out = generate(model, ids, max(max_tokens), prompt_lengths=lengths, **settings)
    for j, (b, record) in enumerate(zip(rows, got, strict=True)):
        tokens, exit_loops, logprobs, reason, exit_logprobs = record
        m = max_tokens[j]
        np.testing.assert_array_equal(tokens, out.tokens[b, :m])
        np.testing.assert_array_equal(exit_loops, out.exit_loops[b, :m])
        np.testing.assert_allclose(logprobs, out.logprobs[b, :m], atol=1e-5, rtol=0)
        np.testing.assert_allclose(exit_logprobs, out.exit_logprobs[b, :m], atol=1e-5, rtol=0)
        assert reason == "length"


SETTINGS = [
    dict(exit_threshold=Q),  # skipped_kv "project" (the default), rows compacted
    pytest.param(dict(exit_threshold=Q, skipped_kv="compute"), marks=pytest.mark.slow),
    pytest.param(dict(exit_threshold=Q, skipped_kv="copy", compact_rows=False), marks=pytest.mark.slow),
    pytest.param(dict(exit_threshold=Q, kv_sharing="last"), marks=pytest.mark.slow),
    pytest.param(dict(exit_policy="hidden_delta_relative", hidden_delta_eps=0.9, kv_sharing="average"),
                 marks=pytest.mark.slow),
    pytest.param(dict(), marks=pytest.mark.slow),  # full depth
    pytest.param(dict(exit_policy="sample", temperature=0.8), marks=pytest.mark.slow),  # drawn exits
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.slow
def test_engine_tokens_equal_generate(model, settings):
    """Ragged prompts, different max_tokens, 2 slots for 3 requests: the third arrives while the others
    decode and takes the slot the first frees."""
    max_tokens = [3, NEW, NEW]
    settings = dict(settings)
    temperature = settings.pop("temperature", 0.0)  # a request's setting (seed 0, as generate's default)
    engine = Engine(model, max_slots=2, max_context=24, **settings)
    got = run(engine, [(row, SamplingParams(max_tokens=m, temperature=temperature, seed=0))
                       for row, m in zip(ROWS, max_tokens, strict=True)], arrive_at=[0, 0, 2])
    assert len({x for _, loops, *_ in got for x in loops.tolist()}) > 1 or not settings
    settings = {**settings, "temperature": temperature}
    assert_matches_generate(model, got, max_tokens, settings)


@pytest.mark.slow
def test_sampled_tokens_do_not_depend_on_neighbours(model):
    """A seeded sampled request draws the same tokens alone, among other requests, and in `generate`."""
    sampling = dict(temperature=0.8, top_k=20, top_p=0.9)
    mine = (ROWS[1], SamplingParams(max_tokens=NEW, seed=11, **sampling))
    alone = run(Engine(model, max_slots=3, max_context=24, exit_threshold=Q), [mine])[0]
    others = [(ROWS[0], SamplingParams(max_tokens=NEW, seed=5, **sampling)),
              (ROWS[2], SamplingParams(max_tokens=2))]
    crowded = run(Engine(model, max_slots=3, max_context=24, exit_threshold=Q), [others[0], mine, others[1]],
                  arrive_at=[0, 1, 0])[1]
    np.testing.assert_array_equal(alone[0], crowded[0])  # tokens
    np.testing.assert_array_equal(alone[1], crowded[1])  # exit loops
    # log-probabilities: the neighbours change the shapes XLA reduces over (compaction buckets), not
    # the numbers beyond float32 rounding
    np.testing.assert_allclose(alone[2], crowded[2], atol=1e-6, rtol=0)
    ids = np.asarray([ROWS[1]])
    out = generate(model, ids, NEW, seed=11, exit_threshold=Q, **sampling)
    np.testing.assert_array_equal(alone[0], out.tokens[0])
    np.testing.assert_allclose(alone[2], out.logprobs[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.7, top_k=20, top_p=0.9)],
                         ids=["greedy", "top_k_top_p"])
@pytest.mark.slow
def test_logprobs_equal_a_float64_recomputation_at_the_exit_loop(model, sampling):
    """The engine's log-probabilities against float64 ones from an uncached forward's per-loop logits at
    each token's exit loop (skipped_kv "compute": the cache holds what the uncached forward computes)."""
    engine = Engine(model, max_slots=2, max_context=24, exit_threshold=Q, skipped_kv="compute")
    got = run(engine, [(row, SamplingParams(max_tokens=NEW, seed=b, **sampling))
                       for b, row in enumerate(ROWS)])
    tokens = np.stack([t for t, *_ in got])
    for b, reference in enumerate(_full_forward_logits(model, tokens)):
        _, exit_loops, logprobs, *_ = got[b]
        assert logprobs.dtype == np.float32
        expected = [_logprob64(reference[i, exit_loops[i] - 1], tokens[b, i], **sampling) for i in range(NEW)]
        np.testing.assert_allclose(logprobs, expected, atol=2e-5, rtol=0)


@pytest.mark.slow
def test_a_finished_row_frees_its_slot_and_stops_at_stop_tokens(model):
    """One slot: requests run one after another, each as alone; a stop token ends a request ("stop")."""
    engine = Engine(model, max_slots=1, max_context=24, exit_threshold=Q)
    first = run(engine, [(ROWS[0], SamplingParams(max_tokens=NEW))])[0]
    stop = int(first[0][2])  # the third token of the first request: it stops there
    got = run(engine, [(ROWS[0], SamplingParams(max_tokens=NEW, stop_token_ids=(stop,))),
                       (ROWS[2], SamplingParams(max_tokens=NEW))])
    np.testing.assert_array_equal(got[0][0], first[0][:list(first[0]).index(stop) + 1])
    assert got[0][3] == "stop" and got[1][3] == "length"
    assert_matches_generate(model, [first, got[1]], [NEW] * 2, dict(exit_threshold=Q), rows=(0, 2))


def test_abort_frees_the_slot(model):
    engine = Engine(model, max_slots=1, max_context=24, exit_threshold=Q)
    rid = engine.add_request(ROWS[0], SamplingParams(max_tokens=NEW))
    assert [e.request_id for e in engine.step()] == [rid, rid]  # the prefill's token and one decoded
    engine.abort(rid)
    assert not engine.has_work()
    assert run(engine, [(ROWS[2], SamplingParams(max_tokens=NEW))])[0][3] == "length"


@pytest.mark.parametrize("prompt, params", [
    ([], SamplingParams()),
    (list(range(24)), SamplingParams()),  # longer than max_context - 1
    ([1, 2], SamplingParams(max_tokens=0)),
    ([1, 500], SamplingParams()),  # outside the vocabulary
    ([1, 2], SamplingParams(temperature=-1.0)),
    ([1, 2], SamplingParams(top_p=0.0)),
    ([1, 2], SamplingParams(exit_threshold=1.5)),
    ([1, 2], SamplingParams(stop=("x",))),  # stop strings need a tokenizer
])
def test_bad_requests_raise_and_change_nothing(model, prompt, params):
    engine = Engine(model, max_slots=1, max_context=24, exit_threshold=Q)
    with pytest.raises(ValueError):
        engine.add_request(prompt, params)
    assert not engine.has_work()
