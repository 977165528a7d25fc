"""Row compaction in `generate(compact_rows=True)`: each loop runs only on the rows that need it, in a
bucket of `row_buckets(B)` rows; the tokens, exit loops and defined cache entries are those of
uncompacted decoding, and the row-loops it reports are those its exit loops imply. skipped_kv "compute"
runs every loop for every row, so there compaction does not apply (and changes nothing)."""

import numpy as np
import pytest

from ouro_jax.inference import generate, left_pad
from ouro_jax.inference.compaction import row_buckets
from ouro_jax.rl.exactness import sharp_model

import util

ROWS = ([5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [40, 41, 42, 43, 44], [60, 2, 99, 14],
        [7, 77, 70, 33, 3, 1], [11, 12], [100, 90, 80, 70, 60, 50, 40], [1, 2, 3, 4])
BATCHES = {"batch1": ROWS[1:2], "batch5_ragged": ROWS[:5], "batch8_ragged": ROWS}
NEW = 17  # the prefill's token and 16 from the decode loop
QS = (0.2, 0.5, 0.8)
STOP = (29, 61)  # stops some rows early, so that rows that have finished are left out too


@pytest.fixture(scope="module")
def model():
    return sharp_model()


def expected_row_loops(exit_loops: np.ndarray, num_loops: int, compute: bool,
                       compact: bool) -> tuple[int, int]:
    """(loops run, row-loops run) of the decode loop, counted from the returned exit loops [B, M]
    (1-based, 0 where no token was generated): at decode step j, loop index t is needed by the rows
    whose token j ran it (exit loop > t); a loop runs on the smallest bucket holding them (compacted)
    or on all B rows (uncompacted), not at all when no row needs it. With "compute" every loop runs
    on all B rows while the decode loop runs."""
    b = exit_loops.shape[0]
    loops = rows = 0
    for step in exit_loops[:, 1:].T:
        if not (step > 0).any():  # the decode loop had stopped
            break
        for t in range(num_loops):
            needed = b if compute else int((step > t).sum())
            if needed:
                loops += 1
                rows += min(s for s in row_buckets(b) if s >= needed) if compact else b
    return loops, rows


@pytest.mark.parametrize("skipped_kv", [pytest.param(kv, marks=() if kv == "copy" else pytest.mark.slow)
                                        for kv in ("compute", "project", "copy")])  # fast subset: batch1-copy
@pytest.mark.parametrize("rows", [pytest.param(v, id=k, marks=() if k == "batch1" else pytest.mark.slow)
                                  for k, v in BATCHES.items()])
def test_compacted_equals_uncompacted(model, rows, skipped_kv):
    """Same tokens, exit loops and defined cache entries at several q; the row-loops each reports match
    the count from its exit loops, and compaction runs fewer of them whenever rows exit or stop."""
    ids, lengths = left_pad(rows)
    t_max, depths, stopped, saved = model.config.total_ut_steps, set(), False, False
    for q in QS:
        outs = {compact: generate(model, ids, NEW, prompt_lengths=lengths, exit_threshold=q,
                                  skipped_kv=skipped_kv, stop_tokens=STOP, compact_rows=compact)
                for compact in (False, True)}
        plain, compact = outs[False], outs[True]
        util.assert_same_decoding(plain, compact)
        for c, out in outs.items():
            loops, row_loops = expected_row_loops(out.exit_loops, t_max, skipped_kv == "compute", c)
            assert (out.stats.loops_run, out.stats.row_loops_run) == (loops, row_loops), f"q={q} compact={c}"
            assert out.stats.row_loops_full_depth == out.stats.loops_full_depth * len(rows)
        depths |= set(plain.exit_loops[plain.exit_loops > 0].tolist())
        stopped |= bool((plain.lengths < NEW).any())
        assert compact.stats.row_loops_run <= plain.stats.row_loops_run
        saved |= compact.stats.row_loops_run < plain.stats.row_loops_run
    assert len(depths) >= 3  # tokens exit after various loops
    assert stopped or len(rows) == 1
    assert saved or len(rows) == 1 or skipped_kv == "compute"


@pytest.mark.parametrize("kv_sharing", ["last", "average"])
@pytest.mark.slow
def test_compacted_equals_uncompacted_with_kv_sharing(model, kv_sharing):
    ids, lengths = left_pad(ROWS[:5])
    for q in QS:
        plain, compact = (generate(model, ids, NEW, prompt_lengths=lengths, exit_threshold=q,
                                   kv_sharing=kv_sharing, stop_tokens=STOP, compact_rows=compact)
                          for compact in (False, True))
        util.assert_same_decoding(plain, compact)
        assert compact.stats.row_loops_run == expected_row_loops(
            compact.exit_loops, model.config.total_ut_steps, False, True)[1]
