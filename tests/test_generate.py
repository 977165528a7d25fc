"""ouro_jax.inference: cached decoding is exact, exit policies, KV sharing, ragged batches, stopping,
parity with the PyTorch export's `generate` and loop skipping (the CLI: test_inference_cli.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ouro_jax.convert.hf import to_torch
from ouro_jax.inference import KVCache, generate, left_pad
from ouro_jax.model import exits
from ouro_jax.model.config import tiny
from ouro_jax.model.ouro import Ouro

ROWS = ([5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2], [40, 41, 42, 43, 44])
NEW = 6
Q = 0.3  # a Q-exit threshold at which the test model's tokens exit after loops 1, 2 and 3


def _model(**overrides) -> Ouro:
    """A tiny Ouro whose exit gate is sharp enough that tokens exit at different loops."""
    model = Ouro(tiny(**overrides), rngs=nnx.Rngs(0))
    model.early_exit_gate.kernel[...] = model.early_exit_gate.kernel[...] * 12
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def batch():
    return left_pad(ROWS)


@nnx.jit
def _forward(model, ids):
    out = model(ids)
    return out.logits, out.gate_logits


def _full_forward(model, tokens) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every loop's logits [M, T, V] and gate logits [M, T] for each generated token of each row of
    ROWS, from one uncached forward over prompt + `tokens` [B, M] (the tokens fed back). Rows are
    right-padded to one length, which causal attention makes invisible to the real positions."""
    seqs = [list(row) + [int(t) for t in tokens[b]] for b, row in enumerate(ROWS)]
    ids = np.zeros((len(seqs), max(map(len, ROWS)) + NEW), np.int32)
    for b, seq in enumerate(seqs):
        ids[b, :len(seq)] = seq
    logits, gates = (np.asarray(x) for x in _forward(model, jnp.asarray(ids)))  # [T, B, S, ...]
    at = lambda b: slice(len(ROWS[b]) - 1, len(ROWS[b]) - 1 + tokens.shape[1])
    return [(logits[:, b, at(b)].transpose(1, 0, 2), gates[:, b, at(b)].T) for b in range(len(ROWS))]


def _full_forward_logits(model, tokens) -> list[np.ndarray]:
    return [logits for logits, _ in _full_forward(model, tokens)]


@pytest.mark.slow
def test_cached_decoding_equals_full_forward_at_every_loop(model, batch):
    ids, lengths = batch
    out = generate(model, ids, NEW, prompt_lengths=lengths, output_loop_logits=True)
    assert (out.exit_loops == model.config.total_ut_steps).all()
    for b, reference in enumerate(_full_forward_logits(model, out.tokens)):
        np.testing.assert_allclose(out.loop_logits[b], reference, atol=1e-5, rtol=0)
        # greedy: each token is the argmax of the last loop given the prefix
        np.testing.assert_array_equal(out.tokens[b], reference[:, -1].argmax(-1))


@pytest.mark.slow
def test_forced_tokens_score_a_given_continuation(model, batch):
    ids, lengths = batch
    forced = np.random.default_rng(0).integers(0, model.config.vocab_size, (len(ROWS), NEW))
    out = generate(model, ids, NEW, prompt_lengths=lengths, forced_tokens=forced, output_loop_logits=True)
    for b, reference in enumerate(_full_forward_logits(model, forced)):
        np.testing.assert_allclose(out.loop_logits[b], reference, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out.tokens[b], reference[:, -1].argmax(-1))


@pytest.mark.slow
def test_exit_threshold_one_equals_full_depth(model, batch):
    ids, lengths = batch
    full = generate(model, ids, NEW, prompt_lengths=lengths)
    q1 = generate(model, ids, NEW, prompt_lengths=lengths, exit_threshold=1.0)
    np.testing.assert_array_equal(q1.tokens, full.tokens)
    np.testing.assert_array_equal(q1.exit_loops, full.exit_loops)
    assert q1.stats.loops_run == full.stats.loops_run == full.stats.loops_full_depth


def test_q_exit_follows_the_gate_cdf(model, batch):
    """The first two tokens see only exact K/V (the prompt's and their own), so their exit loops are
    `exits.q_exit_loop` (a 0-based loop index) of the gate logits of an uncached forward, plus 1."""
    ids, lengths = batch
    out = generate(model, ids, NEW, prompt_lengths=lengths, exit_threshold=Q)
    for b, (_, gates) in enumerate(_full_forward(model, out.tokens)):
        expected = exits.q_exit_loop(jnp.asarray(gates[:2].T), Q)
        np.testing.assert_array_equal(out.exit_loops[b, :2], np.asarray(expected) + 1)


def _logprob64(logits, token, temperature=None, top_k=None, top_p=None) -> float:
    """log p(token) in float64 under logits [V] / temperature, truncated to the top_k largest, then to the
    smallest most-likely set reaching top_p, renormalised (greedy: temperature None, plain log_softmax)."""
    z = np.asarray(logits, np.float64) / (temperature or 1.0)
    keep = np.ones(z.shape, bool)
    if top_k is not None:
        keep &= z >= np.sort(z)[-top_k]
    if top_p is not None:
        order = np.argsort(-np.where(keep, z, -np.inf), kind="stable")
        p = np.exp(z[order] - z[order[0]]) * keep[order]
        p /= p.sum()
        before = np.cumsum(p) - p
        keep &= np.isin(np.arange(z.size), order[before < top_p])
    z = np.where(keep, z, -np.inf)
    return float(z[token] - z.max() - np.log(np.exp(z - z.max()).sum()))


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.7, top_k=20, top_p=0.9)],
                         ids=["greedy", "top_k_top_p"])
@pytest.mark.slow
def test_logprobs_equal_a_float64_recomputation_at_the_exit_loop(model, batch, sampling):
    """Each token's log-probability is that of the distribution it was drawn from (after truncation),
    recomputed in float64 from an uncached forward's logits at the token's exit loop (skipped_kv
    "compute": the cached loops hold exactly what the uncached forward computes)."""
    ids, lengths = batch
    out = generate(model, ids, NEW, prompt_lengths=lengths, exit_threshold=Q, skipped_kv="compute",
                   seed=3, **sampling)
    assert out.logprobs.dtype == np.float32 and len(set(out.exit_loops.ravel().tolist())) > 1
    for b, reference in enumerate(_full_forward_logits(model, out.tokens)):
        expected = [_logprob64(reference[i, out.exit_loops[b, i] - 1], out.tokens[b, i], **sampling)
                    for i in range(NEW)]
        np.testing.assert_allclose(out.logprobs[b], expected, atol=2e-5, rtol=0)
    assert (out.logprobs <= 0).all()


def _log_exit_pdf64(gate_logits) -> np.ndarray:
    """log p(t) over the last axis of gate logits [..., T] in float64: p(t) = lambda_t S_{t-1}, the last
    loop the remaining survival S_{T-1} (written here from the definition, not from `exits`)."""
    g = np.asarray(gate_logits, np.float64)
    log_lam, log_stay = -np.logaddexp(0, -g), -np.logaddexp(0, g)
    before = np.concatenate([np.zeros_like(g[..., :1]), np.cumsum(log_stay, -1)[..., :-1]], -1)
    return before + np.concatenate([log_lam[..., :-1], np.zeros_like(g[..., :1])], -1)


def test_sampled_exits_follow_the_exit_pdf():
    """exit_policy "sample": the first token's exit (every loop of the prompt's last position ran) is a
    draw from the exit pdf of an uncached forward's gates, recorded with its float64-exact log-probability;
    the draws come from a key stream of their own (greedy and sampled tokens get the same exits)."""
    model = Ouro(tiny(), rngs=nnx.Rngs(0))  # an unscaled gate: a spread exit pdf
    rows = 512
    ids = np.asarray([ROWS[1]] * rows)
    settings = dict(exit_policy="sample", seed=np.arange(rows), compact_rows=False)  # M = 1: the prefill
    out = generate(model, ids, 1, temperature=1.0, **settings)
    _, gates = _forward(model, jnp.asarray(ids[:1]))
    log_pdf = _log_exit_pdf64(np.asarray(gates)[:, 0, -1])
    pdf = np.exp(log_pdf)
    assert pdf.max() < 0.7  # several loops are likely, so the histogram tests the draw
    counts = np.bincount(out.exit_loops[:, 0] - 1, minlength=pdf.size)
    np.testing.assert_array_less(np.abs(counts - rows * pdf), 4.5 * np.sqrt(rows * pdf * (1 - pdf)) + 1)
    np.testing.assert_allclose(out.exit_logprobs[:, 0], log_pdf[out.exit_loops[:, 0] - 1], atol=1e-5,
                               rtol=0)
    greedy = generate(model, ids, 1, **settings)
    np.testing.assert_array_equal(greedy.exit_loops[:, 0], out.exit_loops[:, 0])


@pytest.mark.slow
def test_exit_logprobs_equal_a_float64_recomputation(model, batch):
    """Every token's recorded exit log-probability, sampled exits and Q-exit, is log p(exit loop) of the
    gates of an uncached forward (skipped_kv "compute": the cache holds exact K/V), in float64."""
    ids, lengths = batch
    for kwargs in (dict(exit_policy="sample", seed=[3, 4, 5], temperature=0.8), dict(exit_threshold=Q)):
        out = generate(model, ids, NEW, prompt_lengths=lengths, skipped_kv="compute", **kwargs)
        assert out.exit_logprobs.dtype == np.float32 and len(set(out.exit_loops.ravel().tolist())) > 1
        for b, (_, gates) in enumerate(_full_forward(model, out.tokens)):
            expected = np.take_along_axis(_log_exit_pdf64(gates), out.exit_loops[b][:, None] - 1, 1)[:, 0]
            np.testing.assert_allclose(out.exit_logprobs[b], expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 3])
def test_exit_at_loop_uses_loop_k_and_computes_no_further(model, batch, k):
    ids, lengths = batch
    out = generate(model, ids, NEW, prompt_lengths=lengths, exit_at_loop=k, output_loop_logits=True)
    assert (out.exit_loops == k).all()
    assert out.loop_logits.shape[2] == k  # loops after k do not exist
    assert out.stats.loops_run == k * (NEW - 1)
    for b, reference in enumerate(_full_forward_logits(model, out.tokens)):
        reference = reference[:, :k]
        np.testing.assert_allclose(out.loop_logits[b], reference, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out.tokens[b], reference[:, k - 1].argmax(-1))


@pytest.mark.slow
def test_kv_sharing_stores_one_entry_per_layer_for_decoded_tokens(model, batch):
    ids, lengths = batch
    kwargs = dict(prompt_lengths=lengths, exit_threshold=Q, skipped_kv="copy")
    outs = {s: generate(model, ids, NEW, kv_sharing=s, **kwargs) for s in ("none", "last", "average")}
    none = outs["none"].stats.cache_bytes
    t, n = model.config.total_ut_steps, model.config.num_hidden_layers
    for sharing in ("last", "average"):
        nbytes = outs[sharing].stats.cache_bytes
        assert nbytes["prompt"] == none["prompt"]
        assert nbytes["decoded"] * t == none["decoded"]
        assert len(outs[sharing].cache.decode_k) == n and len(outs["none"].cache.decode_k) == t * n
    # The first decoded token sees the same prompt cache in every mode, so its shared entry is its
    # K/V at its exit loop ("last") or the mean over the loops it ran ("average").
    exit_index = outs["none"].exit_loops[:, 1] - 1  # 0-based loop index
    assert len(set(exit_index.tolist())) > 1  # rows exit at different loops
    for layer in range(n):
        per_loop = np.stack([np.asarray(outs["none"].cache.decode_k[s * n + layer][:, :, 0])
                             for s in range(t)])  # [T, B, K, H]
        last = np.asarray(outs["last"].cache.decode_k[layer][:, :, 0])
        average = np.asarray(outs["average"].cache.decode_k[layer][:, :, 0])
        for b, e in enumerate(exit_index):
            np.testing.assert_allclose(last[b], per_loop[e, b], atol=1e-6)
            np.testing.assert_allclose(average[b], per_loop[:e + 1, b].mean(0), atol=1e-6)
            # skipped loops hold a copy of the exit loop's K/V
            for skipped in per_loop[e + 1:, b]:
                np.testing.assert_array_equal(skipped, per_loop[e, b])


def test_kv_sharing_with_one_loop_equals_no_sharing(batch):
    """With T = 1 the shared entry is the only loop's K/V ("average" of one loop is the same entry,
    see the semantics test above)."""
    model = _model(total_ut_steps=1)
    ids, lengths = batch
    none, last = (generate(model, ids, NEW, prompt_lengths=lengths, kv_sharing=s, output_loop_logits=True)
                  for s in ("none", "last"))
    np.testing.assert_array_equal(last.tokens, none.tokens)
    np.testing.assert_allclose(last.loop_logits, none.loop_logits, atol=1e-6)
    assert last.stats.cache_bytes == none.stats.cache_bytes


@pytest.mark.parametrize("kwargs", [
    dict(exit_threshold=Q),  # kv_sharing "none": skipped loops' slots hold copies of the exit loop's K/V
    dict(exit_threshold=Q, kv_sharing="last"),
    dict(temperature=0.8, top_k=20, top_p=0.9, seed=7, exit_policy="hidden_delta_relative",
         hidden_delta_eps=0.9, kv_sharing="average"),
    dict(exit_policy="sample", temperature=0.8, seed=7),
])
@pytest.mark.slow
def test_ragged_batch_equals_each_row_alone(model, batch, kwargs):
    """Also: rows that exit early keep their exit-loop state, exactly as when generated alone."""
    ids, lengths = batch
    out = generate(model, ids, NEW, prompt_lengths=lengths, **kwargs)
    assert len(set(out.exit_loops.ravel().tolist())) > 1  # rows really exit early, unevenly
    for b in (0, 2):  # the shortest and a middle-length row
        alone = generate(model, np.asarray([ROWS[b]]), NEW, **kwargs)
        np.testing.assert_array_equal(out.tokens[b], alone.tokens[0])
        np.testing.assert_array_equal(out.exit_loops[b], alone.exit_loops[0])


def test_sampling_depends_on_seed_and_reproduces(model, batch):
    ids, lengths = batch
    kwargs = dict(prompt_lengths=lengths, temperature=0.8, top_k=20, top_p=0.9,
                  exit_policy="hidden_delta_relative", hidden_delta_eps=0.9, kv_sharing="average")
    a, b = generate(model, ids, NEW, seed=1, **kwargs), generate(model, ids, NEW, seed=1, **kwargs)
    c = generate(model, ids, NEW, seed=2, **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()


def test_stop_tokens_stop_rows_independently(model, batch):
    ids, lengths = batch
    free = generate(model, ids, NEW, prompt_lengths=lengths, pad_id=0).tokens
    stop = int(free[0, 2])  # row 0 stops at index 2 (or earlier if the token repeats)
    out = generate(model, ids, NEW, prompt_lengths=lengths, stop_tokens=(stop,), pad_id=0)
    stopped = 0
    for b in range(len(ROWS)):
        hits = np.flatnonzero(free[b] == stop)
        length = hits[0] + 1 if hits.size else NEW
        stopped += length < NEW
        assert out.lengths[b] == length
        np.testing.assert_array_equal(out.tokens[b, :length], free[b, :length])
        assert (out.tokens[b, length:] == 0).all() and (out.exit_loops[b, length:] == 0).all()
    assert 0 < stopped  # at least row 0 stopped early ...
    assert (out.lengths == NEW).any() or stopped == len(ROWS)  # ... while others may run on


@pytest.mark.slow
def test_decode_stops_when_all_rows_are_done(model):
    ids = np.asarray([ROWS[0]])
    free = generate(model, ids, NEW).tokens[0]
    stop = int(free[1])
    out = generate(model, ids, NEW, stop_tokens=(stop,))
    length = int(np.flatnonzero(free == stop)[0]) + 1
    assert out.lengths[0] == length < NEW
    # the decode loop ran only for the tokens before the stop token
    assert out.stats.loops_run == (length - 1) * model.config.total_ut_steps


def test_early_exit_skips_loops(model, batch):
    ids, lengths = batch
    out = generate(model, ids, NEW, prompt_lengths=lengths, exit_threshold=Q, skipped_kv="copy")
    full = generate(model, ids, NEW, prompt_lengths=lengths)
    assert out.stats.loops_run < full.stats.loops_run == full.stats.loops_full_depth
    # a decode iteration runs until the deepest row of the batch has exited
    assert out.stats.loops_run == int(out.exit_loops[:, 1:].max(0).sum())
    assert out.stats.mean_depth == pytest.approx(out.exit_loops.mean())
    alone = generate(model, np.asarray([ROWS[0]]), NEW, exit_threshold=Q, kv_sharing="last")
    assert alone.stats.loops_run == int(alone.exit_loops[0, 1:].sum()) < alone.stats.loops_full_depth


# the PyTorch export's `exit_at_step` is the released code's 0-based loop index
@pytest.mark.parametrize("torch_kwargs, exit_kwargs", [({}, {}), ({"exit_at_step": 1}, {"exit_at_loop": 2})])
def test_greedy_matches_pytorch_export_generate(model, batch, torch_kwargs, exit_kwargs):
    ids, lengths = batch
    torch_model = to_torch(model)
    mask = torch.tensor((np.arange(ids.shape[1])[None] >= (ids.shape[1] - lengths)[:, None]).astype(np.int64))
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, **torch_kwargs)
    with torch.no_grad():
        batched = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=mask, **gen)
        singles = [torch_model.generate(torch.tensor([row]), **gen)[0, len(row):] for row in ROWS]
    ours = generate(model, ids, NEW, prompt_lengths=lengths, **exit_kwargs).tokens
    np.testing.assert_array_equal(ours, batched[:, ids.shape[1]:].numpy())
    for b in range(len(ROWS)):
        np.testing.assert_array_equal(ours[b], singles[b].numpy())


def test_invalid_arguments_raise(model, batch):
    ids, lengths = batch
    for kwargs in (dict(exit_threshold=1.5), dict(exit_at_loop=5), dict(exit_at_loop=0),
                   dict(kv_sharing="first"), dict(exit_at_loop=2, exit_threshold=0.5),
                   dict(top_p=0.0, temperature=1.0),
                   dict(prompt_lengths=[0, 1, 2]), dict(exit_policy="entropy"), dict(skipped_kv="zero"),
                   dict(exit_policy="hidden_delta", exit_threshold=0.5),
                   dict(exit_policy="sample", exit_threshold=0.5),
                   dict(exit_policy="sample", exit_at_loop=2)):
        with pytest.raises(ValueError):
            generate(model, ids, NEW, **{"prompt_lengths": lengths, **kwargs})


@pytest.mark.parametrize("sharing", ["none", "last", "average"])
def test_cache_of_finished_rows_is_finite(model, batch, sharing):
    """A row that has finished is written with exit loop -1 (no token): its entry must stay finite
    ("average" once divided by exit loop + 1 = 0). Direct on `KVCache.write`, then through generate."""
    t, n, b, kv, h = 3, 2, 3, 2, 4
    zeros = [[jnp.zeros((b, kv, 5, h))] * n for _ in range(t)]
    cache = KVCache.create(zeros, zeros, 4, sharing)
    k = jnp.asarray(np.random.default_rng(0).standard_normal((t, n, b, kv, h)), jnp.float32)
    cache = cache.write(jnp.int32(1), k, k + 1, jnp.asarray([-1, 0, 2]))
    assert all(np.isfinite(np.asarray(x)).all() for x in cache.decode_k + cache.decode_v)
    if sharing == "average":  # the rows that ran loops are unaffected
        np.testing.assert_allclose(np.asarray(cache.decode_k[0][2, :, 1]), np.asarray(k[:, 0, 2].mean(0)),
                                   atol=1e-6)

    ids, lengths = batch
    kwargs = dict(prompt_lengths=lengths, exit_threshold=Q, kv_sharing=sharing)
    free = generate(model, ids, NEW, **kwargs).tokens
    out = generate(model, ids, NEW, stop_tokens=(int(free[0, 1]),), **kwargs)
    assert (out.lengths < NEW).any() and out.lengths.min() < out.lengths.max()  # rows stop, unevenly
    cache = out.cache
    for x in cache.prompt_k + cache.prompt_v + cache.decode_k + cache.decode_v:
        assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.slow
def test_hidden_delta_exits_follow_the_formula(model, batch, relative):
    """Exit loops of exit_policy "hidden_delta" (||h_t - h_{t-1}||_2 < eps, the paper's form) and
    "hidden_delta_relative" (< eps ||h_{t-1}||_2) equal the first loop t >= 2 meeting the rule, computed
    in NumPy float64 from the normed states of an uncached forward over prompt + generated tokens
    (skipped_kv "compute" keeps every token's states exact); the last loop when none does."""
    ids, lengths = batch
    hidden = np.asarray(model(jnp.asarray(ids)).hidden_states, np.float64)  # [T, B, P, D]
    delta = np.linalg.norm(np.diff(hidden, axis=0), axis=-1)  # [T-1, B, P]
    scale = np.linalg.norm(hidden[:-1], axis=-1) if relative else 1.0
    eps = float(np.median(delta / scale))  # fires for about half of the (token, loop) pairs
    out = generate(model, ids, NEW, prompt_lengths=lengths, skipped_kv="compute", hidden_delta_eps=eps,
                   exit_policy="hidden_delta_relative" if relative else "hidden_delta")
    seqs = [list(row) + out.tokens[b].tolist() for b, row in enumerate(ROWS)]
    full = np.zeros((len(ROWS), max(map(len, seqs))), np.int32)
    for b, seq in enumerate(seqs):
        full[b, :len(seq)] = seq
    hidden = np.asarray(model(jnp.asarray(full)).hidden_states, np.float64)
    t_max = hidden.shape[0]
    for b, row in enumerate(ROWS):
        states = hidden[:, b, len(row) - 1:len(row) - 1 + NEW]  # [T, M, D]: the state of each token
        change = np.linalg.norm(states[1:] - states[:-1], axis=-1)  # [T-1, M], loops 2..T
        bound = eps * (np.linalg.norm(states[:-1], axis=-1) if relative else 1.0)
        below = change < bound
        expected = np.where(below.any(0), below.argmax(0) + 2, t_max)  # 1-based loop
        np.testing.assert_array_equal(out.exit_loops[b], expected)
    assert len(set(out.exit_loops.ravel().tolist())) > 1
