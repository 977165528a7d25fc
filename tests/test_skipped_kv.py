"""The K/V of skipped loops in `generate(skipped_kv=...)`: "compute" is the released code's semantics
(every loop runs for every token, the exit only picks the logits), checked against a recompute-everything
reference and the PyTorch export's `generate`; "project" and "copy" are cheaper fills that differ from
it only after a token exited early."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ouro_jax.convert.hf import to_torch
from ouro_jax.inference import generate, left_pad
from ouro_jax.rl.exactness import sharp_model

import oracle
import util

RAGGED = ([5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [40, 41, 42, 43, 44], [60, 2, 99, 14],
          [7, 77, 70, 33, 3, 1])
NEW = 33  # tokens per row: the prefill's and 32 from the decode loop
QS = (0.2, 0.5, 0.8)


@pytest.fixture(scope="module")
def model():
    return sharp_model()


@nnx.jit
def _forward(model, ids):
    out = model(ids)
    return out.logits, out.gate_logits


def _q_exit(gate_logits: np.ndarray, q: float) -> int:
    """0-based exit loop of one token in float64: the first loop whose CDF 1 - prod(1 - lambda) >= q."""
    cdf = 1.0 - np.cumprod(1.0 - 1.0 / (1.0 + np.exp(-gate_logits.astype(np.float64))))
    cdf[-1] = 1.0
    return int(np.argmax(cdf >= q))


def naive_greedy(model, rows, new_tokens: int, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy Q-exit decoding recomputing everything: before each new token the full forward over each
    row's sequence so far (rows right-padded to one width, which causal attention hides from the real
    positions), exit loop from the gate's CDF at the last position, argmax of that loop's logits.
    -> (tokens [B, M], 1-based exit loops [B, M])."""
    seqs = np.zeros((len(rows), max(map(len, rows)) + new_tokens), np.int32)
    for b, row in enumerate(rows):
        seqs[b, :len(row)] = row
    tokens, loops = np.zeros((2, len(rows), new_tokens), np.int64)
    for j in range(new_tokens):
        logits, gates = (np.asarray(x) for x in _forward(model, jnp.asarray(seqs)))
        for b, row in enumerate(rows):
            at = len(row) + j - 1
            exit_loop = _q_exit(gates[:, b, at], q)
            tokens[b, j] = seqs[b, at + 1] = logits[exit_loop, b, at].argmax()
            loops[b, j] = exit_loop + 1
    return tokens, loops


@pytest.mark.parametrize("rows", [RAGGED[1:2], RAGGED], ids=["batch1", "batch5_ragged"])
@pytest.mark.slow
def test_compute_equals_recompute_everything(model, rows):
    ids, lengths = left_pad(rows)
    depths = set()
    for q in QS:
        out = generate(model, ids, NEW, prompt_lengths=lengths, exit_threshold=q, skipped_kv="compute")
        tokens, loops = naive_greedy(model, rows, NEW, q)
        np.testing.assert_array_equal(out.tokens, tokens, err_msg=f"q={q}")
        np.testing.assert_array_equal(out.exit_loops, loops, err_msg=f"q={q}")
        assert out.stats.loops_run == out.stats.loops_full_depth  # every loop ran for every token
        depths |= set(loops.ravel().tolist())
    assert len(depths) >= 3  # tokens exit after various loops, most of them early


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls: one intra-op thread is fastest, and avoids spinning against a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compute_equals_pytorch_export_generate(model, one_torch_thread):
    ids, lengths = left_pad(RAGGED)
    torch_model = to_torch(model)
    mask = torch.tensor((np.arange(ids.shape[1])[None] >= (ids.shape[1] - lengths)[:, None]).astype(np.int64))
    for q in (0.3, 0.7):
        with torch.no_grad():
            theirs = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=mask,
                                          max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                          pad_token_id=0, exit_threshold=q)[:, ids.shape[1]:]
        ours = generate(model, ids, NEW, prompt_lengths=lengths, exit_threshold=q, skipped_kv="compute")
        np.testing.assert_array_equal(ours.tokens, theirs.numpy(), err_msg=f"q={q}")
        assert (ours.exit_loops < model.config.total_ut_steps).any()


@pytest.mark.slow
def test_project_and_copy_differ_from_compute_only_after_an_early_exit(model):
    """Until a row's first decoded token that exited early, its K/V are the same in every policy, so
    its tokens and exit loops are too; the cheap fills run fewer loops and write finite caches."""
    ids, lengths = left_pad(RAGGED)
    t_max = model.config.total_ut_steps
    outs = {kv: generate(model, ids, NEW, prompt_lengths=lengths, exit_threshold=0.5, skipped_kv=kv)
            for kv in ("compute", "project", "copy")}
    compute = outs["compute"]
    for kv in ("project", "copy"):
        out = outs[kv]
        for b in range(len(RAGGED)):
            early = np.flatnonzero(compute.exit_loops[b, 1:] < t_max)
            same = 2 + early[0] if early.size else NEW  # token i + 1 is the first to read token i's K/V
            np.testing.assert_array_equal(out.tokens[b, :same], compute.tokens[b, :same])
            np.testing.assert_array_equal(out.exit_loops[b, :same], compute.exit_loops[b, :same])
        assert (out.tokens != compute.tokens).any()  # the fill does matter on this model
        assert out.stats.loops_run < compute.stats.loops_run
        assert all(np.isfinite(np.asarray(x)).all() for x in out.cache.decode_k + out.cache.decode_v)


@pytest.mark.slow
def test_project_fills_skipped_loops_with_the_exit_states_kv(model):
    """The first decoded token sees exact K/V only, so its exit state is the uncached forward's; the
    slots of the loops it skipped hold RoPE(k_proj(input_layernorm_l(h_exit))) and v_proj(...) for every
    layer l, recomputed here in NumPy float64 from the HF-named weights."""
    ids, lengths = left_pad(RAGGED)
    out = generate(model, ids, 2, prompt_lengths=lengths, exit_threshold=0.5, skipped_kv="project")
    cfg, sd = model.config, util.hf_state_dict(model)
    t_max, n, kv_heads, h = cfg.total_ut_steps, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    seqs = np.zeros((len(RAGGED), ids.shape[1] + 1), np.int32)
    for b, row in enumerate(RAGGED):
        seqs[b, :len(row) + 1] = [*row, out.tokens[b, 0]]
    hidden = np.asarray(model(jnp.asarray(seqs)).hidden_states, np.float64)  # [T, B, S, D]
    checked = 0
    for b, row in enumerate(RAGGED):
        exit_index, at = out.exit_loops[b, 1] - 1, len(row)
        angles = at / cfg.rope_theta ** (np.arange(0, h, 2) / h)
        cos, sin = np.cos(np.tile(angles, 2)), np.sin(np.tile(angles, 2))
        for layer in range(n):
            p = f"model.layers.{layer}."
            normed = oracle._rms_norm(hidden[exit_index, b, at], sd[p + "input_layernorm.weight"],
                                      cfg.rms_norm_eps)
            k = (normed @ sd[p + "self_attn.k_proj.weight"].T).reshape(kv_heads, h)
            k = k * cos + oracle._rotate_half(k) * sin
            v = (normed @ sd[p + "self_attn.v_proj.weight"].T).reshape(kv_heads, h)
            for t in range(exit_index + 1, t_max):
                slot = t * n + layer
                np.testing.assert_allclose(np.asarray(out.cache.decode_k[slot][b, :, 0]), k, atol=1e-4)
                np.testing.assert_allclose(np.asarray(out.cache.decode_v[slot][b, :, 0]), v, atol=1e-4)
                checked += 1
    assert checked > 0
