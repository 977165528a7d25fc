"""Synthetic reasoning tasks as Grain random-access sources, deterministic by index.

A task is a class built as `Task(n=seq_len, seed=..., stream=..., **data.<task name>)` with `vocab_size`,
`__len__`, `__getitem__(i)` and `batch(indices)` (the examples stacked); example `i` is a pure function of
(seed, stream, i), so a source needs no state and any worker can produce any example. `stream` separates
the training examples (0) from the held-out ones (1). An example is a dict of int32 [n] arrays with the
batch keys of `ouro_jax.data.pipeline`: `input_ids`, `targets`, `loss_mask`, `answer_mask`, `segment_ids`
and `positions`. Tasks whose examples are shorter than n are left-padded (segment id 0, token 0, no loss),
so the answer is always at the end of the row. Targets are never inputs: a loss position predicts a
value that the row does not show (the p-hop target, a sum digit not yet written, a variable's value).

The tasks (the synthetic suite of Saunshi et al., arXiv:2502.17416, and the capacity control of the Ouro
paper, arXiv:2510.25741 §6):

* `PHop`: p-hop induction, fixed p or a per-example mix of p (a hop-count token says which).
* `Addition`: n-ary addition, answer only (no intermediate sums), most significant digit first.
* `ModularGraph`: i-GSM-style modular arithmetic over a random dependency graph, shuffled statements.
* `Facts`: a fixed table of synthetic facts to memorise, for bits per parameter.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

TASK_LENGTH = 2**31  # examples per stream; examples are drawn fresh by index
_MAX_DRAWS = 1000  # rejection-sampling attempts before a configuration is declared infeasible


def _generators(seed: int, stream: int, indices) -> list[np.random.Generator]:
    """One generator per example: a pure function of (seed, stream, index)."""
    return [np.random.default_rng([seed, stream, int(i)]) for i in indices]


def _left_padded(rows: list[dict[str, list[int]]], n: int) -> dict[str, np.ndarray]:
    """Variable-length examples (lists of `input_ids`, `targets`, `loss_mask`, `answer_mask`) ->
    the batch keys, int32 [len(rows), n], left-padded; positions count from 0 at the first real token."""
    out = {k: np.zeros((len(rows), n), np.int32) for k in
           ("input_ids", "targets", "loss_mask", "answer_mask", "segment_ids", "positions")}
    for r, row in enumerate(rows):
        length = len(row["input_ids"])
        if length > n:
            raise ValueError(f"an example of {length} tokens does not fit data.seq_len={n}")
        for key in ("input_ids", "targets", "loss_mask", "answer_mask"):
            out[key][r, n - length:] = row[key]
        out["segment_ids"][r, n - length:] = 1
        out["positions"][r, n - length:] = np.arange(length)
    return out


# p-hop ------------------------------------------------------------------------------------------------


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


def _rowwise_phop_targets(x: np.ndarray, hops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`phop_targets` with a hop count per row: x [B, n], hops [B] -> (targets [B, n], defined [B, n])."""
    targets, defined = np.zeros(x.shape, np.int32), np.zeros(x.shape, bool)
    for p in np.unique(hops):
        rows = hops == p
        targets[rows], defined[rows] = phop_targets(x[rows], int(p))
    return targets, defined


@dataclasses.dataclass(frozen=True)
class PHop:
    """p-hop induction (Saunshi et al. Def. A.1 after Sanford et al.) over `alphabet` symbols.

    x is a Markov chain with no adjacent repeats (x_0 uniform, then each symbol uniform over the others),
    so the hop f(i) = 1 + max{j < i : x_j = x_i} (undefined when x_i has not occurred before) moves
    strictly back. The p-hop target at i is x at f^p(i); the loss is dense over the positions where
    f^p(i) is defined, and the answer is the target at the last position. Sequences whose last position
    has no full chain are rejected and redrawn from the same generator.

    p_min = 0: every example has p hops; n symbols, token ids 0..alphabet-1.
    p_min in 1..p: mixed difficulty. Each example draws its hop count h uniformly from p_min..p; token 0
    is the hop-count token alphabet + h - 1 (no loss on it), followed by n - 1 symbols with h-hop
    targets; vocab_size = alphabet + p.
    """

    n: int
    p: int = 3
    alphabet: int = 4
    p_min: int = 0
    seed: int = 0
    stream: int = 0

    def __post_init__(self):
        if self.n < 2 or self.p < 1 or self.alphabet < 2 or not 0 <= self.p_min <= self.p:
            raise ValueError(f"p-hop needs n >= 2, p >= 1, alphabet >= 2, 0 <= p_min <= p; got n={self.n}, "
                             f"p={self.p}, alphabet={self.alphabet}, p_min={self.p_min}")

    @property
    def mixed(self) -> bool:
        return self.p_min > 0

    @property
    def vocab_size(self) -> int:
        return self.alphabet + (self.p if self.mixed else 0)

    def hops_of(self, rows) -> np.ndarray:
        """The hop count of each mixed-difficulty example, read from its first token (the hop-count token
        alphabet + h - 1 that `batch` writes): rows, token lists or [R, ...] -> [R] int."""
        return np.asarray([r[0] for r in rows]) - self.alphabet + 1

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
        rngs = _generators(self.seed, self.stream, indices)
        hops = np.array([g.integers(self.p_min, self.p + 1) for g in rngs]) if self.mixed else np.full(
            len(rngs), self.p)
        length = self.n - 1 if self.mixed else self.n
        x = self.sample(np.stack([g.random(length) for g in rngs]))
        targets, defined = _rowwise_phop_targets(x, hops)
        for _ in range(_MAX_DRAWS):
            redraw = np.flatnonzero(~defined[:, -1])
            if not redraw.size:
                break
            x[redraw] = self.sample(np.stack([rngs[k].random(length) for k in redraw]))
            targets[redraw], defined[redraw] = _rowwise_phop_targets(x[redraw], hops[redraw])
        else:
            raise ValueError(f"p-hop: no sequence with a full {self.p}-hop chain at its last position in "
                             f"{_MAX_DRAWS} draws (n={self.n}, alphabet={self.alphabet}); raise n or lower p")
        if self.mixed:
            head = (self.alphabet + hops - 1).astype(np.int32)[:, None]
            x = np.concatenate([head, x], axis=1)
            targets = np.concatenate([np.zeros_like(head), targets], axis=1)
            defined = np.concatenate([np.zeros(head.shape, bool), defined], axis=1)
        shape = x.shape
        answer_mask = np.zeros(shape, np.int32)
        answer_mask[:, -1] = 1
        return {"input_ids": x, "targets": targets, "loss_mask": defined.astype(np.int32),
                "answer_mask": answer_mask, "segment_ids": np.ones(shape, np.int32),
                "positions": np.tile(np.arange(self.n, dtype=np.int32), (shape[0], 1))}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.batch([index]).items()}


# n-ary addition ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Addition:
    """n-ary addition, answer only (Saunshi et al. §A.1, scaled down): "a_1 + a_2 + ... + a_k = s".

    Operands are uniform in 0..10^digits - 1, written with `digits` digits (zero-padded); the sum is
    written with `answer_digits` digits, most significant first, zero-padded. k = `terms`, or uniform in
    terms_min..terms when terms_min > 0. Tokens: digits 0-9, then "+" and "=" (10, 11). With
    `column_tokens` each operand digit also names its column: digit d in column c (0: units) is token
    10 (c + 1) + d, the sum's digits stay 0-9 and "+", "=" follow (10 (digits + 1), + 1), so attention can
    select a column by content instead of by relative position (as Abacus embeddings do, McLeish et al.
    2024). The loss (and the answer) covers the positions whose next token is a digit of the sum: "="
    and all sum digits but the last; the answer is right when all of them are (exact match, as greedy
    decoding would write it).
    """

    n: int
    terms: int = 8
    terms_min: int = 0
    digits: int = 2
    column_tokens: bool = False
    seed: int = 0
    stream: int = 0

    def __post_init__(self):
        if self.terms < 2 or self.digits < 1 or self.terms_min not in (0, *range(2, self.terms + 1)):
            raise ValueError(f"addition needs terms >= 2, digits >= 1, terms_min 0 or in 2..terms; got "
                             f"terms={self.terms}, terms_min={self.terms_min}, digits={self.digits}")
        longest = self.terms * (self.digits + 1) + self.answer_digits
        if self.n < longest:
            raise ValueError(f"addition of {self.terms} {self.digits}-digit numbers needs data.seq_len >= "
                             f"{longest}, got {self.n}")

    @property
    def answer_digits(self) -> int:
        return len(str(self.terms * (10**self.digits - 1)))

    @property
    def plus(self) -> int:
        return 10 * (self.digits + 1) if self.column_tokens else 10

    @property
    def equals(self) -> int:
        return self.plus + 1

    @property
    def vocab_size(self) -> int:
        return self.equals + 1

    def __len__(self) -> int:
        return TASK_LENGTH

    def example(self, rng: np.random.Generator) -> dict[str, list[int]]:
        """One example from `rng`: token lists of its length (k (digits + 1) + answer_digits)."""
        k = int(rng.integers(self.terms_min, self.terms + 1)) if self.terms_min else self.terms
        operands = rng.integers(0, 10**self.digits, size=k)
        tokens = []
        columns = 10 * np.arange(self.digits, 0, -1) if self.column_tokens else np.zeros(self.digits, int)
        for j, a in enumerate(operands):
            digits = [int(c) for c in str(a).zfill(self.digits)]
            tokens += ([self.plus] if j else []) + [int(d + c) for d, c in zip(digits, columns, strict=True)]
        equals = len(tokens)
        tokens += [self.equals] + [int(c) for c in str(int(operands.sum())).zfill(self.answer_digits)]
        mask = [0] * len(tokens)
        mask[equals:-1] = [1] * self.answer_digits
        return {"input_ids": tokens, "targets": [*tokens[1:], 0], "loss_mask": mask, "answer_mask": mask}

    def batch(self, indices) -> dict[str, np.ndarray]:
        return _left_padded([self.example(g) for g in _generators(self.seed, self.stream, indices)], self.n)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.batch([index]).items()}


# i-GSM-style modular dependency graphs ----------------------------------------------------------------


OPS = (np.add, np.subtract, np.multiply)  # token order PLUS, MINUS, TIMES


@dataclasses.dataclass(frozen=True)
class ModularGraph:
    """i-GSM-style problems (Saunshi et al. §4.2, after Ye et al., "Physics of LMs 2.1"): variables
    defined by modular arithmetic over a random dependency graph, statements in random order.

    `variables` nodes are split over levels 0..depth (sizes as equal as possible). A level-0 node is a
    constant "v = c" (c uniform mod `modulus`); a level-l node is "v = a op b" with a uniform on level
    l - 1 (so it is exactly l operations deep), b uniform on levels < l, op uniform in {+, -, *}, all mod
    `modulus`. Names are a random draw of distinct tokens from `names`. The statements are shuffled, then
    a query token "?" and every variable's name once, in random order with a deepest variable last. The
    target at each queried name is its value (the values of defined variables are never written), so the
    loss is dense over the queries; the answer is the last query. Flat names replace the paper's entity
    hierarchy (which only shapes the English rendering and the graph's sparsity).

    Tokens: values 0..modulus-1, then + - * = ?, then the names.
    """

    n: int
    variables: int = 8
    depth: int = 3
    modulus: int = 7
    names: int = 16
    seed: int = 0
    stream: int = 0

    def __post_init__(self):
        if not 1 <= self.depth < self.variables <= self.names or self.modulus < 2:
            raise ValueError(f"igsm needs 1 <= depth < variables <= names and modulus >= 2; got "
                             f"variables={self.variables}, depth={self.depth}, names={self.names}, "
                             f"modulus={self.modulus}")
        if self.n < self.length:
            raise ValueError(f"igsm with {self.variables} variables over depth {self.depth} needs "
                             f"data.seq_len >= {self.length}, got {self.n}")

    @property
    def level_sizes(self) -> list[int]:
        q, r = divmod(self.variables, self.depth + 1)
        return [q + (level < r) for level in range(self.depth + 1)]

    @property
    def length(self) -> int:
        """Tokens of one example: 3 per constant, 5 per operation, "?" and one query per variable."""
        leaves = self.level_sizes[0]
        return 3 * leaves + 5 * (self.variables - leaves) + 1 + self.variables

    @property
    def vocab_size(self) -> int:
        return self.modulus + 5 + self.names

    def token(self, what: str) -> int:
        """Token id of "+", "-", "*", "=" or "?"."""
        return self.modulus + "+-*=?".index(what)

    def __len__(self) -> int:
        return TASK_LENGTH

    def example(self, rng: np.random.Generator) -> dict[str, list[int]]:
        """One problem from `rng` (node k's level: `np.repeat(range(depth + 1), level_sizes)[k]`)."""
        level = np.repeat(np.arange(self.depth + 1), self.level_sizes)
        name = self.modulus + 5 + rng.permutation(self.names)[:self.variables]
        value = np.zeros(self.variables, np.int64)
        statements = []
        for k in range(self.variables):
            if level[k] == 0:
                value[k] = rng.integers(self.modulus)
                statements.append([name[k], self.token("="), value[k]])
                continue
            a = rng.choice(np.flatnonzero(level == level[k] - 1))
            b = rng.choice(np.flatnonzero(level < level[k]))
            op = int(rng.integers(len(OPS)))
            value[k] = OPS[op](value[a], value[b]) % self.modulus
            statements.append([name[k], self.token("="), name[a], self.token("+-*"[op]), name[b]])
        question = rng.choice(np.flatnonzero(level == self.depth))
        queries = [*rng.permutation([k for k in range(self.variables) if k != question]), question]
        tokens = [int(t) for s in rng.permutation(len(statements)) for t in statements[s]]
        head = len(tokens) + 1
        tokens += [self.token("?"), *(int(name[k]) for k in queries)]
        targets = [0] * head + [int(value[k]) for k in queries]
        loss = [0] * head + [1] * self.variables
        return {"input_ids": tokens, "targets": targets, "loss_mask": loss,
                "answer_mask": [0] * (len(tokens) - 1) + [1]}

    def batch(self, indices) -> dict[str, np.ndarray]:
        return _left_padded([self.example(g) for g in _generators(self.seed, self.stream, indices)], self.n)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.batch([index]).items()}


# Knowledge capacity -----------------------------------------------------------------------------------


@functools.cache
def fact_table(world_seed: int, entities: int, attributes: int, values: int) -> np.ndarray:
    """The facts to memorise: value[e, a] uniform in 0..values-1, int64 [entities, attributes]."""
    return np.random.default_rng([world_seed]).integers(values, size=(entities, attributes))


@dataclasses.dataclass(frozen=True)
class Facts:
    """Synthetic facts for the knowledge-capacity control (Ouro §6 after Allen-Zhu & Li's Capo):
    entity e = (first, last name) has attribute a with value `fact_table(...)[e, a]`.

    A row holds n // 4 facts "first last attribute value"; the target at the attribute token is the
    value (loss and answer there). The table depends on `world_seed` only, so every model and training
    seed memorises the same F = first_names * last_names * attributes facts of log2(values) bits each.
    Stream 0 (training) draws facts uniformly by index; stream 1 enumerates all facts in a fixed order,
    example i holding facts i * (n // 4) ... (mod F): memorisation is measured on the trained facts.

    Tokens: values, then attributes, then first names, then last names.
    """

    n: int
    first_names: int = 32
    last_names: int = 32
    attributes: int = 32
    values: int = 64
    world_seed: int = 0
    seed: int = 0
    stream: int = 0

    def __post_init__(self):
        if self.n < 4 or min(self.first_names, self.last_names, self.attributes) < 1 or self.values < 2:
            raise ValueError(f"facts needs data.seq_len >= 4, at least one name and attribute, values >= 2; "
                             f"got n={self.n}")

    @property
    def num_facts(self) -> int:
        return self.first_names * self.last_names * self.attributes

    @property
    def facts_per_row(self) -> int:
        return self.n // 4

    @property
    def vocab_size(self) -> int:
        return self.values + self.attributes + self.first_names + self.last_names

    def __len__(self) -> int:
        return TASK_LENGTH

    def fact_ids(self, indices) -> np.ndarray:
        """Fact ids (e * attributes + a) of examples `indices`: int64 [len(indices), n // 4]."""
        k = self.facts_per_row
        if self.stream == 0:
            return np.stack([g.integers(self.num_facts, size=k)
                             for g in _generators(self.seed, self.stream, indices)])
        return (np.asarray(indices, np.int64)[:, None] * k + np.arange(k)) % self.num_facts

    def batch(self, indices) -> dict[str, np.ndarray]:
        ids = self.fact_ids(indices)
        entity, attribute = np.divmod(ids, self.attributes)
        first, last = np.divmod(entity, self.last_names)
        value = fact_table(self.world_seed, self.first_names * self.last_names, self.attributes,
                           self.values)[entity, attribute]
        offset = self.values + self.attributes
        facts = np.stack([offset + first, offset + self.first_names + last, self.values + attribute, value],
                         axis=-1)  # [B, k, 4]
        rows, k = ids.shape
        start = self.n - 4 * k  # left padding when n is not a multiple of 4
        x = np.zeros((rows, self.n), np.int32)
        x[:, start:] = facts.reshape(rows, 4 * k)
        targets, mask = np.zeros_like(x), np.zeros_like(x)
        targets[:, start + 2::4] = value
        mask[:, start + 2::4] = 1
        segments = np.zeros_like(x)
        segments[:, start:] = 1
        positions = np.zeros_like(x)
        positions[:, start:] = np.arange(4 * k)
        return {"input_ids": x, "targets": targets, "loss_mask": mask, "answer_mask": mask.copy(),
                "segment_ids": segments, "positions": positions}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.batch([index]).items()}


TASKS = {"phop": PHop, "addition": Addition, "igsm": ModularGraph, "facts": Facts}
