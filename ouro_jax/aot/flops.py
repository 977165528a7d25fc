"""Analytic FLOP counts of Ouro's train step and generation (matmuls only; 1 multiply-add = 2 FLOPs).

XLA's `cost_analysis()` counts the body of a `while` / `scan` once, not once per iteration, so it
undercounts a model whose N layers and T loops are scans. These counts follow the model instead
(arXiv:2510.25741 §3, Eq. 1): every loop t = 1..T runs the N shared layers, then `model.norm`, the exit
gate and the LM head (the training objective reads every loop's CE, §3.3).

Per token and layer application (D hidden, Nq query heads, K kv heads, H head_dim, F mlp, V vocab):
  projections  2 D H (2 Nq + 2 K)          q, k, v, o
  mlp          6 D F                       gate, up, down
  attention    4 Nq H k                    scores and context over k keys
and per token and loop: LM head 2 D V, gate 2 D. Elementwise work (norms, RoPE, softmax) is left out.

`model` counts useful work: causal attention (query i sees i + 1 keys, (S + 1) / 2 on average), backward
= 2 x forward. `executed` counts what the compiled step runs: attention over all S keys for the `xla`
kernel (it masks a full S x S score matrix), plus the forward work recomputed in the backward pass by
the layer's remat policy and by the recomputed in-loop readout (the LM head). `executed / peak` is the
step-time lower bound; `model / (time x peak)` is MFU.
"""

from __future__ import annotations

import dataclasses

from ouro_jax.model.config import OuroConfig

# Attention kernels that skip the masked upper triangle (their executed attention is the causal count).
CAUSAL_KERNELS = ("cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs of one layer application per token: projections, mlp, and attention per key."""

    projections: float
    mlp: float
    attention_per_key: float

    def total(self, keys: float) -> float:
        return self.projections + self.mlp + self.attention_per_key * keys


def layer_flops(cfg: OuroConfig) -> LayerFlops:
    d, h, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    nq, k = cfg.num_attention_heads, cfg.num_key_value_heads
    return LayerFlops(projections=2 * d * h * (2 * nq + 2 * k), mlp=6 * d * f, attention_per_key=4 * nq * h)


def readout_flops(cfg: OuroConfig) -> tuple[float, float]:
    """(LM head, exit gate) forward FLOPs per token and loop."""
    return 2 * cfg.hidden_size * cfg.vocab_size, 2 * cfg.hidden_size


def recomputed_per_token(cfg: OuroConfig, keys: float) -> float:
    """Forward FLOPs of one layer application that `cfg.remat_policy` recomputes in the backward pass.

    full: the whole layer. save_qkv_context: o_proj and the whole MLP (the sandwich norms after them
    need their outputs in the backward pass). save_qkv: that plus the attention. dots_no_batch: the
    attention (its matmuls have batch dimensions). dots, none: nothing.
    """
    lf = layer_flops(cfg)
    d, h, nq = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    after_context = 2 * nq * h * d + lf.mlp
    return {
        "none": 0.0,
        "dots": 0.0,
        "dots_no_batch": lf.attention_per_key * keys,
        "save_qkv": after_context + lf.attention_per_key * keys,
        "save_qkv_context": after_context,
        "full": lf.total(keys),
    }[cfg.remat_policy]


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """model: useful FLOPs (MFU numerator); executed: what the compiled program computes."""

    model: float
    executed: float


def train_step_flops(cfg: OuroConfig, rows: int, seq_len: int, *, num_loops: int | None = None,
                     stage: int = 1) -> StepFlops:
    """One optimiser step over `rows` x `seq_len` tokens (all micro-batches), T = `num_loops` loops.

    Stage I trains everything (backward 2 x forward, the readout recomputed once per loop). Stage II
    trains only the gate (§3.4): the LM's backward pass is never computed.
    """
    t = cfg.total_ut_steps if num_loops is None else num_loops
    tokens = rows * seq_len
    lf = layer_flops(cfg)
    head, gate = readout_flops(cfg)
    n = cfg.num_hidden_layers
    causal_keys = (seq_len + 1) / 2
    executed_keys = causal_keys if cfg.attention_impl in CAUSAL_KERNELS else seq_len
    forward_model = t * (n * lf.total(causal_keys) + head + gate)
    forward_exec = t * (n * lf.total(executed_keys) + head + gate)
    if stage == 2:
        return StepFlops(model=tokens * (forward_model + 2 * t * gate),
                         executed=tokens * (forward_exec + 2 * t * gate))
    recompute = t * (n * recomputed_per_token(cfg, executed_keys) + head)
    return StepFlops(model=tokens * 3 * forward_model, executed=tokens * (3 * forward_exec + recompute))


def prefill_flops(cfg: OuroConfig, batch: int, prompt_len: int) -> StepFlops:
    """Prefill of `generate`: every prompt token through all T loops; gate and LM head at the last
    position only. Executed attention covers the full P x P masked matrix."""
    t, n = cfg.total_ut_steps, cfg.num_hidden_layers
    lf = layer_flops(cfg)
    head, gate = readout_flops(cfg)
    per_row = lambda keys: t * (prompt_len * n * lf.total(keys) + gate) + head
    return StepFlops(model=batch * per_row((prompt_len + 1) / 2), executed=batch * per_row(prompt_len))


def decode_flops(cfg: OuroConfig, batch: int, context: int) -> StepFlops:
    """One decoded token per row at full depth over `context` cached keys per (loop, layer): T loops of
    N layers, a gate per loop, one LM head. The cache is read whole (static shapes), so executed =
    model."""
    t, n = cfg.total_ut_steps, cfg.num_hidden_layers
    head, gate = readout_flops(cfg)
    flops = batch * (t * (n * layer_flops(cfg).total(context + 1) + gate) + head)
    return StepFlops(model=flops, executed=flops)
