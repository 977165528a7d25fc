"""Exit replay (ouro_jax.rl.replay): the trainer's parallel forward under the rollout's recorded exits gives
the log-probs the sampler recorded, for every skipped_kv and KV-sharing mode of `generate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouro_jax.inference import generate, left_pad
from ouro_jax.rl import replay
from ouro_jax.rl.exactness import RAGGED, rollout, sharp_model

TOL = 1e-5  # max |Δ log-prob|, float32 on CPU
NEW = 16
TEMPERATURE = 0.9
SETTINGS = [("none", "compute"), ("none", "copy"), ("none", "project"), ("last", "copy"), ("average", "copy")]


@pytest.fixture(scope="module")
def model():
    return sharp_model()


def _check_replay(model, rows, exit_kwargs, kv_sharing, skipped_kv):
    """Replayed token and exit log-probs equal the rollout's record; a fixed-depth trainer's do not.
    exit_kwargs: Q-exit (exit_threshold=q) or sampled exits (exit_policy="sample")."""
    ids, lengths, out = rollout(model, rows, NEW, TEMPERATURE, 0, kv_sharing=kv_sharing,
                                skipped_kv=skipped_kv, **exit_kwargs)
    assert (out.exit_loops[0] == 0).any()  # the first row stopped: its tail is masked, not replayed
    recorded = out.logprobs
    cols = replay.columns(ids, lengths, out.tokens, out.exit_loops, model.config.total_ut_steps)
    replayed = replay.replay_jit(model, cols, ids.shape[1], TEMPERATURE, skipped_kv=skipped_kv,
                                 kv_sharing=kv_sharing)
    mask = out.exit_loops > 0
    np.testing.assert_array_less(np.abs(np.asarray(replayed.logprobs) - recorded)[mask], TOL)
    np.testing.assert_array_less(np.abs(np.asarray(replayed.exit_logprobs) - out.exit_logprobs)[mask], TOL)
    # A fixed-depth trainer (last loop, as ouro_rl trains) scores the same tokens very differently.
    last, mixture = replay.fixed_depth_logprobs(model, cols, ids.shape[1], TEMPERATURE)
    assert np.abs(np.asarray(last) - recorded)[mask].max() > 100 * TOL
    assert np.abs(np.asarray(mixture) - recorded)[mask].max() > 100 * TOL
    return set(out.exit_loops[mask].tolist())


@pytest.mark.slow
def test_replay_equals_rollout_project_batch5_ragged(model):
    assert len(_check_replay(model, RAGGED, dict(exit_threshold=0.5), "none", "project")) >= 2  # depths vary


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("kv_sharing,skipped_kv", SETTINGS)
def test_replay_equals_rollout(model, kv_sharing, skipped_kv, batch):
    depths, rows = set(), RAGGED[1:2] if batch == 1 else RAGGED
    for exit_kwargs in (dict(exit_threshold=0.3), dict(exit_policy="sample")):
        depths |= _check_replay(model, rows, exit_kwargs, kv_sharing, skipped_kv)
    assert len(depths) >= 2  # the exits vary


@pytest.mark.slow
def test_replay_fixed_depth_exit_at_loop(model):
    """`exit_at_loop=k` runs k loops (the cache holds only those): replayed with num_loops=k."""
    ids, lengths = left_pad(RAGGED)
    out = generate(model, ids, NEW, prompt_lengths=lengths, exit_at_loop=2, temperature=TEMPERATURE,
                   seed=list(range(5)))
    cols = replay.columns(ids, lengths, out.tokens, out.exit_loops, 2)
    replayed = replay.replay_jit(model, cols, ids.shape[1], TEMPERATURE, skipped_kv="compute", num_loops=2)
    np.testing.assert_array_less(np.abs(np.asarray(replayed.logprobs) - out.logprobs), TOL)


def test_columns_layout():
    """Column P - 1 + i produces token i; prompt columns keep every loop's K/V; a stopped row's tail
    replays at full depth with target 0 (its tokens are masked out of every loss)."""
    ids, lengths = left_pad([[7, 8, 9], [5]])
    tokens = np.array([[1, 2, 3], [4, 3, 0]])
    loops = np.array([[2, 1, 4], [3, 1, 0]])
    cols = replay.columns(ids, lengths, tokens, loops, 4)
    np.testing.assert_array_equal(cols.ids, [[7, 8, 9, 1, 2], [0, 0, 5, 4, 3]])
    np.testing.assert_array_equal(cols.positions, [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
    np.testing.assert_array_equal(cols.valid, [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(cols.exit_index, [[3, 3, 1, 0, 3], [3, 3, 2, 0, 3]])
    np.testing.assert_array_equal(cols.kv_exit, [[3, 3, 3, 0, 3], [3, 3, 3, 0, 3]])
    np.testing.assert_array_equal(cols.targets, [[0, 0, 1, 2, 3], [0, 0, 4, 3, 0]])


@pytest.mark.slow
@pytest.mark.parametrize("kv_sharing,skipped_kv", [("none", "project"), ("average", "copy")])
def test_replay_is_differentiable(model, kv_sharing, skipped_kv):
    """The policy gradient flows through the replay (under sharing: through its last pass)."""
    from flax import nnx

    ids, lengths = left_pad(RAGGED[:2])
    tokens = np.array([[11, 12, 13, 14], [21, 22, 23, 24]])
    cols = replay.columns(ids, lengths, tokens, np.array([[1, 2, 3, 1], [4, 2, 1, 3]]), 4)

    def loss(model):
        return -jnp.sum(replay.replay(model, cols, ids.shape[1], 1.0, skipped_kv=skipped_kv,
                                      kv_sharing=kv_sharing).logprobs)

    grads = nnx.jit(nnx.grad(loss))(model)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0

