"""The decode loop's phases (`cache_phases`): the decoded-token slots grow from FIRST_PHASE positions,
doubling, to M, and attention reads only the current phase's slots. Decoding in many short phases must
give what decoding in one phase gives, for every skipped-K/V policy and KV sharing, with ragged prompts
and rows that stop early."""

import pytest

from ouro_jax.inference import generate, left_pad, step
from ouro_jax.rl.exactness import sharp_model

import util

ROWS = ([5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [40, 41, 42, 43, 44], [60, 2, 99, 14], [11, 12])
NEW = 23  # with FIRST_PHASE = 8: phases of 8, 16 and 23 positions
STOP = (13, 29, 61, 92, 109)


@pytest.mark.parametrize("m", [1, 2, 3, 63, 64, 65, 66, 100, 128, 129, 130, 1000])
def test_phases_double_up_to_m(m):
    """FIRST_PHASE, doubling, then M; every phase runs at least one token (positions 0..M-2 are written:
    a phase past position M-2 would be compiled and never run) and holds at most twice the previous one."""
    phases = step.cache_phases(m)
    assert phases[-1] == m
    assert phases[:-1] == tuple(step.FIRST_PHASE * 2**j for j in range(len(phases) - 1))
    if len(phases) > 1:
        assert phases[-2] < m - 1 <= 2 * phases[-2]
    else:
        assert m - 1 <= step.FIRST_PHASE


@pytest.fixture(scope="module")
def model():
    return sharp_model()


@pytest.mark.parametrize("settings", [
    dict(),
    dict(exit_threshold=0.5, skipped_kv="project"),
    dict(exit_threshold=0.3, skipped_kv="copy", compact_rows=False, kv_sharing="average"),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "full_depth")
@pytest.mark.slow
def test_many_phases_equal_one_phase(model, settings, monkeypatch):
    ids, lengths = left_pad(ROWS)
    one = generate(model, ids, NEW, prompt_lengths=lengths, stop_tokens=STOP, **settings)
    monkeypatch.setattr(step, "FIRST_PHASE", 8)
    assert step.cache_phases(NEW) == (8, 16, NEW)
    many = generate(model, ids, NEW, prompt_lengths=lengths, stop_tokens=STOP, **settings)
    util.assert_same_decoding(one, many)
    assert many.cache.decoded_length == one.cache.decoded_length == NEW
    assert (many.stats.loops_run, many.stats.row_loops_run) == (one.stats.loops_run, one.stats.row_loops_run)
    assert (one.lengths > 16).any()  # some row decodes into the last phase
    assert (one.lengths < NEW).any()  # and some row stops early
