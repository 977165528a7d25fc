"""Row compaction of the decode loop (`generate(compact_rows=True)`): each loop of a token runs only on
the rows that need it (unfinished and not yet exited), gathered with their cache rows into the smallest
bucket of `row_buckets(B)` that holds them, chosen by `lax.switch` (static shapes: one compilation holds
every bucket), and scattered back. An empty bucket skips the loop; the full bucket runs without gathering.

Shapes: B batch, S bucket rows, N layers, K kv heads, H head_dim, D hidden.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

GATHER_SHARE = 4
"""A bucket of S rows gathers its cache slots for attention when S <= B / GATHER_SHARE; a larger one
attends over the whole batch's slots (its layers' matmuls still run on S rows only). Gathering copies the
slots (read, write, read again), so on a bandwidth-bound CPU it pays only for small buckets; measured by
`python -m ouro_jax.benchmarks --bench=decode.rows --row_batches=8,32` against a variant that gathers
every bucket."""


def row_buckets(batch: int) -> tuple[int, ...]:
    """The bucket sizes for a batch of B rows: the powers of two below B, then B (e.g. 1, 2, 4, 5 for
    B = 5), so a bucket never holds more than twice the rows it needs."""
    return (*(1 << i for i in range((batch - 1).bit_length())), batch)


def gathers(rows: int, batch: int) -> bool:
    """Whether a bucket of `rows` rows reads its rows' cache slots gathered (`GATHER_SHARE`)."""
    return rows * GATHER_SHARE <= batch


# run(h [B, 1, D], rows [S] int32 or None) -> (normed [S, 1, D], k, v [N, S, K, H]): one loop's N layers
RunRows = Callable[[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array, jax.Array]]


def _on_bucket(run: RunRows, size: int, needed, kv_zeros, h):
    """The loop on the first `size` rows where `needed` [B] (size 0: none, size B: all rows)
    -> (h [B, 1, D] with those rows advanced, k, v [N, B, K, H], zero on the other rows)."""
    b = h.shape[0]
    if size == 0:
        return h, kv_zeros, kv_zeros
    if size == b:
        return run(h, None)
    rows = jnp.nonzero(needed, size=size, fill_value=b)[0]
    h_rows, k, v = run(h, rows)
    return (h.at[rows].set(h_rows, mode="drop"), kv_zeros.at[:, rows].set(k, mode="drop"),
            kv_zeros.at[:, rows].set(v, mode="drop"))


def compacted_loop(run: RunRows, needed, h, kv_shape: tuple[int, ...]):
    """One loop on the smallest bucket of `row_buckets(B)` holding every `needed` [B] row.

    kv_shape: (N, B, K, H). Returns (h [B, 1, D], k, v [N, B, K, H] zero on rows not run, the bucket's
    rows (scalar int32, 0 when the loop was skipped)).
    """
    sizes = (0, *row_buckets(h.shape[0]))
    bounds = jnp.asarray(sizes, jnp.int32)
    bucket = jnp.sum(bounds < jnp.sum(needed, dtype=jnp.int32))
    kv_zeros = jnp.zeros(kv_shape, h.dtype)
    h, k, v = jax.lax.switch(bucket, [functools.partial(_on_bucket, run, size, needed, kv_zeros)
                                      for size in sizes], h)
    return h, k, v, bounds[bucket]


def skippable_loop(run: RunRows, needed, h, kv_shape: tuple[int, ...]):
    """One loop for the whole batch under `lax.cond`, only while some row is `needed` [B] (rows that do
    not need it ride along). Returns as `compacted_loop` (B rows, or 0 when skipped)."""
    kv_zeros = jnp.zeros(kv_shape, h.dtype)
    any_needed = jnp.any(needed)
    h, k, v = jax.lax.cond(any_needed, lambda h: run(h, None),
                           functools.partial(_on_bucket, run, 0, needed, kv_zeros), h)
    return h, k, v, jnp.where(any_needed, h.shape[0], 0).astype(jnp.int32)
