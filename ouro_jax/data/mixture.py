"""Weighted mixtures of data sources (`data.source = "mixture"`), mixed per document before packing.

`data.mixture` maps a name to one component: {"weight": w, "source": ..., and that source's keys}, e.g.
  {"sft": {"weight": 0.3, "source": "chat", "chat": {"files": "/data/sft/*.jsonl"}},
   "replay": {"weight": 0.7, "source": "array_record", "array_record": {"paths": "/data/stage2"}}}
A component's keys go over the top-level data config (`seq_len`, `tokenizer`, `eval_fraction`, ...), so
each is a complete single-source config; a component may be a task, text, chat or ArrayRecord shards.
Weights are >= 0 and sum to a positive number (0 leaves a component out); they need not sum to 1.
With `data.mix_by="tokens"` (default) a weight is a share of the tokens: documents are drawn in proportion
to weight / mean length, the mean over `LENGTH_SAMPLE` evenly spaced training documents (a task's
examples all have seq_len tokens); with "documents" it is a share of the documents.

Stream: each component's training documents (tasks: examples, by index), shuffled (seed + its position)
and repeated forever -> `grain.MapDataset.mix` by weight (deterministic by index: any prefix of the mix
holds each component in proportion to its weight, up to rounding) -> process shard -> pack. Each token
carries `source_ids` = 1 + its component's position (0 = padding), negated on a document's first token,
so the trainer counts tokens and documents per source (`SourceCounter`) and pops the key before the
step. Held-out batches mix the components' held-out documents the same way (tasks: their held-out stream).
"""

from __future__ import annotations

import math

import grain
import jax
import numpy as np
from absl import logging

SOURCE_IDS = "source_ids"
MIX_BY = ("tokens", "documents")
LENGTH_SAMPLE = 256  # documents whose mean length stands for a component's (mix_by="tokens")


def components(cfg, resolve) -> list[tuple[str, float, object]]:
    """(name, weight, resolved single-source config) of each component with a positive weight, in name
    order.

    `resolve` is `pipeline.resolve_config`. Raises ValueError naming the key on a bad component or weights
    that are not finite, are negative or do not sum to a positive number."""
    if not cfg.mixture:
        raise ValueError("data.source='mixture' needs data.mixture: {name: {weight, source, ...}}")
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("mixture", "source")}
    out, total = [], 0.0
    for name, component in cfg.mixture.items():
        component = dict(component)
        weight = component.pop("weight", None)
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"data.mixture.{name}.weight must be a finite number >= 0, got {weight!r}")
        if component.get("source") in (None, "mixture"):
            raise ValueError(f"data.mixture.{name}.source must name a single source")
        total += weight
        if weight > 0:
            out.append((name, float(weight), resolve({**base, **component}, prefix=f"data.mixture.{name}")))
    if not total > 0:
        raise ValueError(f"data.mixture weights must sum to a positive number, got {total}")
    return out


def mean_length(docs) -> float:
    """Mean token count of up to `LENGTH_SAMPLE` evenly spaced examples of `docs` (random access)."""
    picks = np.unique(np.linspace(0, len(docs) - 1, min(LENGTH_SAMPLE, len(docs))).astype(int))
    return float(np.mean([len(docs[int(i)]["input_ids"]) for i in picks]))


def tag(example: dict[str, np.ndarray], position: int) -> dict[str, np.ndarray]:
    """Add `source_ids` [L] (1 + position; negated on the first token) to a document example."""
    ids = np.full(len(example["input_ids"]), position + 1, np.int32)
    ids[0] = -ids[0]
    return {**example, SOURCE_IDS: ids}


class Tagged:
    """A random-access source of examples with `source_ids` added (`tag`)."""

    def __init__(self, source, position: int):
        self.source, self.position = source, position

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return tag(self.source[index], self.position)


def mix(datasets: list[grain.MapDataset], weights: list[float]) -> grain.MapDataset:
    """`grain.MapDataset.mix`, one component left as it is."""
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


class SourceCounter:
    """Tokens and documents per mixture source from the batches' `source_ids`, on the host.

    `add(batch)` pops `source_ids` and counts; `flush()` returns {"tokens/NAME": tokens since the last
    flush} (summed over processes) and logs the epochs per source since this process started
    (documents drawn / training documents; endless task streams report documents only)."""

    def __init__(self, names: list[str], sizes: list[int | None]):
        self.names, self.sizes = names, sizes
        self.tokens = np.zeros(len(names), np.int64)  # since the last flush
        self.documents = np.zeros(len(names), np.int64)  # since the last flush
        self.total_documents = np.zeros(len(names), np.int64)  # since this process started

    def add(self, batch: dict[str, np.ndarray]) -> None:
        ids = batch.pop(SOURCE_IDS, None)
        if ids is None or not self.names:
            return
        k = np.arange(1, len(self.names) + 1)
        self.tokens += (np.abs(ids)[..., None] == k).sum(axis=tuple(range(ids.ndim)))
        self.documents += (ids[..., None] == -k).sum(axis=tuple(range(ids.ndim)))

    def flush(self) -> dict[str, float]:
        if not self.names:
            return {}
        tokens, documents = self.tokens, self.documents
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            tokens = multihost_utils.process_allgather(tokens).sum(axis=0)
            documents = multihost_utils.process_allgather(documents).sum(axis=0)
        self.tokens, self.documents = np.zeros_like(self.tokens), np.zeros_like(self.documents)
        self.total_documents += documents
        epochs = ", ".join(
            f"{name} {n / size:.3f}" if size else f"{name} {n} documents"
            for name, n, size in zip(self.names, self.total_documents, self.sizes, strict=True))
        logging.info("epochs per source: %s", epochs)
        return {f"tokens/{name}": float(n) for name, n in zip(self.names, tokens, strict=True)}
