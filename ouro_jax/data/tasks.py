"""Synthetic reasoning tasks as Grain random-access sources, deterministic by index.

A task is a class built as `Task(n=seq_len, seed=..., stream=..., **data.<task name>)` with `__len__`,
`__getitem__(i)` and `batch(indices)` (the examples stacked); example `i` is a pure function of
(seed, stream, i), so a source needs no state and any worker can produce any example. `stream` separates
the training examples (0) from the held-out ones (1). An example is a dict of int32 [n] arrays with the
batch keys of `ouro_jax.data.pipeline`: `input_ids`, `targets`, `loss_mask`, `answer_mask`, `segment_ids`
(all 1: one sequence per row) and `positions`.

p-hop induction (phop_calibration.md §1, Sanford et al.): x is a Markov chain over an alphabet of
`alphabet` symbols with no adjacent repeats. The hop f(i) = 1 + max{j < i : x_j = x_i} (undefined when x_i
has not occurred before) moves strictly back. The p-hop target at i is x at f^p(i); the loss is dense over
the positions where f^p(i) is defined, and the task answer is the target at the last position. Sequences
whose last position has no full chain are rejected and redrawn from the same generator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TASK_LENGTH = 2**31  # examples per stream; p-hop examples are drawn fresh by index
_MAX_DRAWS = 1000  # rejection-sampling attempts before a configuration is declared infeasible


def hop(x: np.ndarray) -> np.ndarray:
    """One hop: x [..., n] -> f [..., n] int64, f(i) = 1 + max{j < i : x_j = x_i}, -1 where undefined."""
    order = np.argsort(x, axis=-1, kind="stable")  # positions grouped by symbol, increasing within a group
    grouped = np.take_along_axis(x, order, axis=-1)
    same = grouped[..., 1:] == grouped[..., :-1]
    f = np.full(x.shape, -1, np.int64)
    np.put_along_axis(f, order[..., 1:], np.where(same, order[..., :-1] + 1, -1), axis=-1)
    return f


def phop_targets(x: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """x [..., n] -> (targets [..., n] int32 = x at f^p(i), 0 where undefined; defined [..., n] bool)."""
    f = hop(x)
    f = np.concatenate([f, np.full((*f.shape[:-1], 1), -1)], axis=-1)  # f[..., -1] = -1: stays undefined
    pos = np.broadcast_to(np.arange(x.shape[-1]), x.shape)
    for _ in range(p):
        pos = np.take_along_axis(f, pos, axis=-1)
    defined = pos >= 0
    return np.where(defined, np.take_along_axis(x, pos, axis=-1), 0).astype(np.int32), defined


@dataclasses.dataclass(frozen=True)
class PHop:
    """p-hop induction sequences of length n over `alphabet` symbols (token ids 0..alphabet-1)."""

    n: int
    p: int = 3
    alphabet: int = 4
    seed: int = 0
    stream: int = 0

    def __post_init__(self):
        if self.n < 2 or self.p < 1 or self.alphabet < 2:
            raise ValueError(f"p-hop needs n >= 2, p >= 1, alphabet >= 2; got n={self.n}, p={self.p}, "
                             f"alphabet={self.alphabet}")

    @property
    def vocab_size(self) -> int:
        return self.alphabet

    def __len__(self) -> int:
        return TASK_LENGTH

    def sample(self, u: np.ndarray) -> np.ndarray:
        """Uniforms u [..., n] in [0, 1) -> x [..., n] int32 with no adjacent repeats: x_0 uniform and
        x_i = (x_{i-1} + r_i) mod alphabet, r_i uniform in 1..alphabet-1."""
        steps = np.floor(u * (self.alphabet - 1)).astype(np.int64) + 1
        steps[..., 0] = np.floor(u[..., 0] * self.alphabet)
        return (np.cumsum(steps, axis=-1) % self.alphabet).astype(np.int32)

    def batch(self, indices) -> dict[str, np.ndarray]:
        """Examples `indices`, stacked: int32 [len(indices), n]. One generator per index; hops vectorised."""
        rngs = [np.random.default_rng([self.seed, self.stream, int(i)]) for i in indices]
        x = self.sample(np.stack([rng.random(self.n) for rng in rngs]))
        targets, defined = phop_targets(x, self.p)
        for _ in range(_MAX_DRAWS):
            redraw = np.flatnonzero(~defined[:, -1])
            if not redraw.size:
                break
            x[redraw] = self.sample(np.stack([rngs[k].random(self.n) for k in redraw]))
            targets[redraw], defined[redraw] = phop_targets(x[redraw], self.p)
        else:
            raise ValueError(f"p-hop: no sequence with a full {self.p}-hop chain at its last position in "
                             f"{_MAX_DRAWS} draws (n={self.n}, alphabet={self.alphabet}); raise n or lower p")
        shape = x.shape
        answer_mask = np.zeros(shape, np.int32)
        answer_mask[:, -1] = 1
        return {"input_ids": x, "targets": targets, "loss_mask": defined.astype(np.int32),
                "answer_mask": answer_mask, "segment_ids": np.ones(shape, np.int32),
                "positions": np.tile(np.arange(self.n, dtype=np.int32), (shape[0], 1))}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.batch([index]).items()}


TASKS = {"phop": PHop}
