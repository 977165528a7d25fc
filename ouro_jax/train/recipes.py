"""Training recipes as ConfigDict builders, importable from the installed package.

The files in the project's `configs/` choose a recipe and parse their `:variant` with
`config.parse_variant`; benchmarks, experiments and tests build the same configs from here without the
repository checkout on `sys.path`.

  demo(steps)              1 layer x 4 loops learns 3-hop induction in minutes on 2 CPU cores
  text(size)               language modelling on local .txt/.jsonl (KJV by default)
  pretraining(stage, model)  the paper's five pre-training stages (arXiv:2510.25741 §4.1, Table 1)
  gate_stage2(model)       Stage II: train only the exit gate of a trained model (§3.4)
  sft(model, weighting)    chat supervised fine-tuning: a CPU demonstration or the released shapes
"""

from __future__ import annotations

import ml_collections

from ouro_jax.model.config import OuroConfig, ouro_1p4b, ouro_2p6b
from ouro_jax.train.config import base_config, model_dict


def demo(steps: int = 1500) -> ml_collections.ConfigDict:
    """p-hop induction (n = 32, p = 3, alphabet 4), a hidden-64 block looped 4 times, dense loss."""
    c = base_config()
    c.total_steps = steps
    c.log_every_steps = 50
    c.eval_every_steps = 250
    c.checkpoint_every_steps = 500
    c.model = model_dict(OuroConfig(
        vocab_size=4, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, rope_theta=10_000.0,
        max_position_embeddings=32, total_ut_steps=4, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        scan_layers=False, remat_policy="full"))  # the fastest setting for this tiny model on CPU
    c.objective.beta = 0.1
    c.optimizer.update(learning_rate=2e-3, b2=0.98, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1)
    c.data.update(source="phop", seq_len=32, batch_size=128, eval_batches=32)
    c.data.phop.update(p=3, alphabet=4)
    return c


TEXT_SIZES = {
    "cpu": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, head_dim=32),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=64),
    "medium": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=12, head_dim=64),
}


def text(size: str = "small") -> ml_collections.ConfigDict:
    """Language modelling on `data.text.files` (default: the KJV Bible). "small" and "medium" use the
    bundled Ouro tokenizer (vocab 49152); "cpu" is byte-level (vocab 259, padded to 320) with a hidden-128
    2-layer block and short rows, so that 2 CPU cores show the per-loop held-out loss fall in minutes."""
    if size == "cpu":
        return _text_cpu()
    c = base_config()
    c.total_steps = 2000
    c.log_every_steps = 20
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.model = model_dict(OuroConfig(
        vocab_size=49152, rope_theta=10_000.0, max_position_embeddings=4096, total_ut_steps=4,
        **TEXT_SIZES[size]))
    c.objective.beta = 0.1
    c.optimizer.update(learning_rate=1e-3, warmup_steps=100, schedule="wsd", decay_steps=400)
    c.data.update(source="text", seq_len=256, batch_size=16, eval_batches=8, tokenizer="ouro")
    c.data.text.update(files="kjv", field="text")  # one document per chapter
    return c


def _text_cpu() -> ml_collections.ConfigDict:
    c = base_config()
    c.total_steps = 600
    c.log_every_steps = 20
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 200
    c.model = model_dict(OuroConfig(
        vocab_size=320, rope_theta=10_000.0, max_position_embeddings=1024, total_ut_steps=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, scan_layers=False, **TEXT_SIZES["cpu"]))
    c.objective.beta = 0.05
    c.optimizer.update(learning_rate=3e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1)
    c.data.update(source="text", seq_len=128, batch_size=16, eval_batches=8, tokenizer="bytes")
    c.data.text.update(files="kjv", field="text")
    return c


# stage: (tokens, seq_len, tokens per batch, schedule, peak lr, final lr, T, beta, rope_theta)
STAGES = {
    "1a": (3e12, 4096, 4 * 2**20, "constant", 3e-4, 3e-4, 8, 0.1, 10_000.0),
    "1b": (3e12, 4096, 8 * 2**20, "constant", 3e-4, 3e-4, 4, 0.05, 10_000.0),
    "2": (1.4e12, 16384, 8 * 2**20, "cosine", 3e-4, 3e-5, 4, 0.05, 40_000.0),
    "3": (2e10, 65536, 8 * 2**20, "constant", 3e-5, 3e-5, 4, 0.05, 1_000_000.0),
    "4": (3e11, 32768, 8 * 2**20, "cosine", 3e-5, 1e-5, 4, 0.05, 1_000_000.0),
}
MODELS = {"ouro_1p4b": ouro_1p4b, "ouro_2p6b": ouro_2p6b}
# Micro-batches per step on a v5p-128 (64 chips), full remat and the splash kernel: the fewest whose
# compiled step leaves >= 10 % of HBM free (Ouro-2.6B stage 3: the only whole-row split, 96 % full),
# measured with `python -m ouro_jax.aot --topology=v5p-128` (docs/pod_scale.md, "Goals").
# On another slice, measure again (`--search`) and set --config.optimizer.grad_accum_steps.
GRAD_ACCUM_V5P_128 = {
    ("ouro_1p4b", "1a"): 1, ("ouro_1p4b", "1b"): 2, ("ouro_1p4b", "2"): 2, ("ouro_1p4b", "3"): 2,
    ("ouro_1p4b", "4"): 2,
    ("ouro_2p6b", "1b"): 4, ("ouro_2p6b", "2"): 4, ("ouro_2p6b", "3"): 2, ("ouro_2p6b", "4"): 4,
}


def pretraining(stage: str, model: str = "ouro_1p4b") -> ml_collections.ConfigDict:
    """One pre-training stage (Table 1): tokens, context, schedule, T, beta, RoPE base of `STAGES`.

    Batch 8M tokens (4M in stage 1a); AdamW (0.9, 0.95), weight decay 0.1, clip 1.0. Sized for a TPU
    slice: FSDP over every chip, full remat, the splash kernel (on GPUs set
    `--config.model.attention_impl=cudnn`), `GRAD_ACCUM_V5P_128` micro-batches. The warmup length
    and AdamW epsilon are not published; 2000 steps and 1e-8 are our choices. Stages after 1a start from
    the previous stage's parameters (`init_from`; the optimiser state restarts). Ouro-2.6B is upcycled
    from a 24-layer stage-1a run by layer duplication at the start of stage 1b (`init_upcycle`).
    """
    tokens, seq_len, batch_tokens, schedule, peak, final, loops, beta, theta = STAGES[stage]
    c = base_config()
    rows = batch_tokens // seq_len
    c.total_steps = int(tokens // batch_tokens)
    c.log_every_steps = 10
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.model = model_dict(MODELS[model]().replace(
        total_ut_steps=loops, rope_theta=theta, dtype="bfloat16", param_dtype="float32",
        remat_policy="full", attention_impl="splash"))
    c.objective.beta = beta
    c.optimizer.update(learning_rate=peak, schedule=schedule, min_lr_ratio=final / peak,
                       warmup_steps=2000 if stage == "1a" else 0, b1=0.9, b2=0.95, weight_decay=0.1,
                       clip_norm=1.0)
    c.data.update(source="array_record", seq_len=seq_len, batch_size=rows, num_workers=8,
                  eval_batches=16, tokenizer="ouro")
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.optimizer.grad_accum_steps = GRAD_ACCUM_V5P_128[model, stage]
    if model == "ouro_2p6b" and stage == "1b":
        c.init_upcycle = "stacked"
    if stage == "4":
        c.data.update(source="mixture", mix_by="tokens")
        c.data.mixture = STAGE4_MIXTURE
    return c


STAGE4_MIXTURE = {
    "sft": {"weight": 90.0, "source": "chat", "chat": {"files": "", "mask": "all"}},
    "stage1": {"weight": 30.0, "source": "array_record", "array_record": {"paths": ""}},
    "stage2": {"weight": 180.0, "source": "array_record", "array_record": {"paths": ""}},
}
"""Stage 4 (§4.1): 90B tokens of ChatML SFT data, 30B of Stage 1 replay, 180B of Stage 2 replay (weights
are token shares). Whether Stage 4 trained every token of the SFT conversations is not published; as
pre-training does, `mask="all"` trains them all (`--config.data.mixture.sft.chat.mask=assistant` for the
assistant turns only)."""


def gate_stage2(model: str = "demo") -> ml_collections.ConfigDict:
    """Stage II on top of `demo` or a released shape (stage-4 data settings): LM frozen, gate trained
    with k = 50, gamma = 0.005 against loss-improvement targets, pairing "next" (measured best). Needs
    `init_from` (the trained model).
    Stage II data, steps and LR are not published; these are our choices."""
    if model == "demo":
        c = demo(steps=300)
    else:
        c = pretraining("4", model)
        c.data.source = "array_record"  # Stage II reads pre-training shards, not the Stage 4 mixture
        c.total_steps = 2000
    c.objective.stage = 2
    # the next loop's improvement supervises each gate: on fixed and mixed p-hop it beat both the printed
    # pairing and the Stage I gate at equal depth (docs/experiments.md); the printed one did not
    c.objective.pairing = "next"
    c.optimizer.update(learning_rate=1e-3, schedule="constant", warmup_steps=50, weight_decay=0.0)
    return c


SFT_MODELS = ("cpu", "ouro_1p4b", "ouro_2p6b")
SFT_WEIGHTING = "exit_pdf"
"""The default SFT objective, chosen by the measured comparison on `sft("cpu")` in docs/sft.md."""


def sft(model: str = "cpu", weighting: str = SFT_WEIGHTING) -> ml_collections.ConfigDict:
    """Chat SFT on `data.chat.files` with the loss on assistant turns (`objective.weighting`: Stage I
    "exit_pdf", the released code's "logit_mixture" or "last_loop").

    "cpu": the byte-level `text("cpu")` model on `chat.generated_conversations()` (no files needed),
    128-token rows. "ouro_1p4b" / "ouro_2p6b": the Thinking models' SFT (§4.2): 32K context, Adam
    (0.9, 0.95) without weight decay, lr 2e-5 cosine, 2 epochs, from `init_from` (an HF
    directory such as a download of ByteDance/Ouro-1.4B, or a run). Batch (64 rows of 32K), warmup (1 %)
    and steps (about 2 epochs of 8.3M conversations of ~4K tokens) are not published: set
    `--config.total_steps` for your data.
    """
    if model == "cpu":
        c = text("cpu")
        c.total_steps = 400
        c.log_every_steps = 20
        c.eval_every_steps = 100
        c.optimizer.update(learning_rate=2e-3, warmup_steps=40, schedule="cosine", min_lr_ratio=0.1)
        c.data.update(source="chat", seq_len=128, batch_size=16, eval_batches=8, eval_fraction=0.05)
        c.data.chat.files = "generated"
    else:
        c = pretraining("4", model)
        c.data.update(source="chat", seq_len=32768, batch_size=64, num_epochs=2)
        c.data.chat.files = ""
        c.total_steps = 32_000
        c.optimizer.update(learning_rate=2e-5, schedule="cosine", min_lr_ratio=0.0, warmup_steps=320,
                           b1=0.9, b2=0.95, weight_decay=0.0, grad_accum_steps=1)
    c.data.chat.update(mask="assistant", overflow="truncate")
    c.objective.weighting = weighting
    return c
