"""train.sft: chat SFT next to pre-training through the whole training loop, at one shape.

Both runs are `python -m ouro_jax.train`'s loop (`train.loop.train`) with the same model, optimiser,
objective, batch rows and row length; only the data path differs: `configs/sft.py:cpu` (the generated
conversations in ChatML, packed with segment ids, the loss on assistant tokens) and
`configs/text.py:cpu` reading the same conversations' messages as plain text documents (every token a
target). tokens/s counts every token of every row, as training logs it; the trained tokens
(those with loss weight) are reported beside it. Steps after the first two (compilation, warm-up) are
timed, each logged on its own; the figure is their median.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from ouro_jax.benchmarks.common import Result, model_config, table

_BYTE_VOCAB = 320  # the byte-level tokenizer's ids fit in it (`tokenizer.load("bytes")`)


def _config(kind: str, *, steps: int, batch: int, seq_len: int, shape: str, text_file: Path):
    from ouro_jax.train import recipes
    from ouro_jax.train.config import model_dict

    c = recipes.sft("cpu") if kind == "sft" else recipes.text("cpu")
    if kind == "pretraining":
        c.data.text.files = str(text_file)
    model = model_config(shape, bos_token_id=1, eos_token_id=2, pad_token_id=0, scan_layers=False)
    model = model.replace(vocab_size=max(model.vocab_size, _BYTE_VOCAB),
                          max_position_embeddings=max(model.max_position_embeddings, seq_len))
    c.model = model_dict(model)
    c.update_from_flattened_dict({"total_steps": steps, "log_every_steps": 1, "eval_every_steps": 0,
                                  "checkpoint_every_steps": 0, "async_checkpointing": False,
                                  "data.batch_size": batch, "data.seq_len": seq_len})
    return c


def _trained_fraction(config, batches: int) -> float:
    """Mean loss weight per token over the first `batches` training batches."""
    from ouro_jax.data import pipeline

    stream = iter(pipeline.build_train_dataset(config.data, seed=config.seed))
    return float(np.mean([next(stream)["loss_mask"].mean() for _ in range(batches)]))


def sft_vs_pretraining(*, steps: int, batch: int, seq_len: int, shape: str = "cpu_benchmark") -> Result:
    """Median tokens/s of `steps` training steps (the first two untimed) of SFT and of pre-training;
    goal: SFT >= 0.9x pre-training (packing conversations costs no compute beyond the data)."""
    from ouro_jax import run
    from ouro_jax.data import chat
    from ouro_jax.train import loop

    if steps < 3:
        raise ValueError(f"steps={steps}: at least 3 (the first two are not timed)")
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "conversations.jsonl"
        with open(text_file, "w") as f:
            for messages in chat.generated_conversations():
                f.write(json.dumps({"text": "\n".join(m["content"] for m in messages)}) + "\n")
        for kind in ("pretraining", "sft"):
            config = _config(kind, steps=steps, batch=batch, seq_len=seq_len, shape=shape,
                             text_file=text_file)
            loop.train(config, f"{tmp}/{kind}")
            records = map(json.loads, (Path(tmp) / kind / run.METRICS).read_text().splitlines())
            speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 2]
            trained = _trained_fraction(config, batches=min(steps, 8))
            tokens_per_s = statistics.median(speeds)
            figures[kind] = {"tokens_per_s": tokens_per_s, "trained_fraction": trained,
                             "timed_steps": len(speeds)}
            rows.append([kind, config.data.source, f"{tokens_per_s:,.0f}", f"{trained:.2f}",
                         f"{tokens_per_s * trained:,.0f}"])
    ratio = figures["sft"]["tokens_per_s"] / figures["pretraining"]["tokens_per_s"]
    text = (table(["run", "data", "tokens/s (median)", "trained fraction", "trained tokens/s"], rows)
            + f"\n\nSFT / pre-training tokens/s: {ratio:.2f}x (goal >= 0.9x; batch {batch} x {seq_len}, "
            f"{steps} steps, the first two untimed)")
    return Result(text, {**figures, "ratio": ratio, "batch": batch, "seq_len": seq_len, "steps": steps,
                         "shape": shape})
