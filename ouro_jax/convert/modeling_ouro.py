"""PyTorch / Hugging Face modeling code of Ouro (LoopLM, arXiv:2510.25741), shipped in ouro_jax exports.

Written for transformers 5.x from the paper (arXiv:2510.25741) and the released checkpoints, whose
parameter names it uses.
The file imports only torch and transformers, so it works both as `ouro_jax.convert.modeling_ouro` and
copied next to `configuration_ouro.py` into a Hugging Face directory (`trust_remote_code=True`).

Model: token embedding, then `total_ut_steps` (T) loops over all `num_hidden_layers` (N) sandwich-norm
decoder layers, each loop followed by `model.norm`; the normed state is carried into the next loop and
read by the LM head and by the exit gate `model.early_exit_gate` (one logit per token and step).

Notation for shapes: B batch, S new tokens, K = cached + new tokens, D hidden, H heads, G kv heads,
E head dim, V vocab, T loop steps.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.utils import ModelOutput

from .configuration_ouro import OuroConfig


class OuroRMSNorm(nn.Module):
    """RMSNorm: normalise in float32, cast back to the input dtype, then scale by `weight` (no offset)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for positions [B, S] -> (cos, sin), each [B, S, E] in `dtype`.

    inv_freq[j] = theta^(-2j/E); the angles and their cos/sin are computed in float32 (half-split layout:
    both halves of the head dimension share frequency j).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        angles = position_ids.float()[..., None] * inv_freq  # [B, S, E/2]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, E], cos/sin [B, S, E] -> [B, heads, S, E]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


def _attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, S, K] (True = may attend), K = past_len + S, or None.

    Query i sits at cache index past_len + i and sees the non-padding keys at indices <= its own.
    Every query also sees itself, so a padding query never has an empty row (NaN in some SDPA
    backends); its output is ignored. `attention_mask` is the usual 2-D [B, K] padding mask over
    cached and new tokens (1 = real token). None (no padding, and either no cache or a single new
    token) means SDPA's own causal mask suffices, which keeps its fastest kernels available.
    """
    kv_len = past_len + q_len
    if attention_mask is not None and attention_mask.shape[-1] != kv_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} tokens, expected cached + new = {kv_len}"
        )
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and (past_len == 0 or q_len == 1):
        return None
    q_idx = torch.arange(past_len, kv_len, device=device)[:, None]
    k_idx = torch.arange(kv_len, device=device)[None, :]
    mask = (k_idx <= q_idx)[None]  # [1, S, K]
    if attention_mask is not None:
        mask = (mask & attention_mask[:, None, :].bool()) | (k_idx == q_idx)  # [B, S, K]
    return mask[:, None]


class OuroAttention(nn.Module):
    """Bias-free multi-head (or grouped-query) causal self-attention with half-split RoPE."""

    def __init__(self, config: OuroConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        d, e = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * e, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * e, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * e, bias=False)
        self.o_proj = nn.Linear(self.num_heads * e, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
        slot: int,
    ) -> torch.Tensor:
        """x [B, S, D], cos/sin [B, S, E], mask [B|1, 1, S, K] or None (plain causal);
        appends K/V to cache slot `slot`."""
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, slot)  # [B, G, K, E]
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
            dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5,
        )  # [B, H, S, E]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))


class OuroMLP(nn.Module):
    """SwiGLU feed-forward: down_proj(act(gate_proj(x)) * up_proj(x)), bias-free."""

    def __init__(self, config: OuroConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class OuroDecoderLayer(nn.Module):
    """Sandwich-norm block: x += norm2(attn(norm1(x))); x += norm4(mlp(norm3(x)))."""

    def __init__(self, config: OuroConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = OuroAttention(config)
        self.mlp = OuroMLP(config)
        self.input_layernorm = OuroRMSNorm(d, eps)
        self.input_layernorm_2 = OuroRMSNorm(d, eps)
        self.post_attention_layernorm = OuroRMSNorm(d, eps)
        self.post_attention_layernorm_2 = OuroRMSNorm(d, eps)

    def forward(self, x, cos, sin, mask, cache, slot) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; other arguments as in `OuroAttention.forward`."""
        x = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slot))
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))


@dataclass
class OuroModelOutput(ModelOutput):
    """Output of `OuroModel`.

    last_hidden_state: [B, S, D] normed state after the last loop step.
    past_key_values: the per-step cache (T*N slots, slot = step * N + layer).
    hidden_states_per_step: [T, B, S, D] normed state after each loop step (input of LM head and gate).
    gate_logits: [T, B, S] exit-gate logits of each step (lambda_t = sigmoid).
    """

    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states_per_step: torch.Tensor | None = None
    gate_logits: torch.Tensor | None = None


@dataclass
class OuroCausalLMOutput(ModelOutput):
    """Output of `OuroForCausalLM` (S' = positions kept by `logits_to_keep`).

    loss: next-token loss with `labels` (`OuroForCausalLM.forward`).
    logits: [B, S', V] logits of the selected exit step of each token (or the weighted mixture).
    past_key_values: the per-step cache.
    exit_pdf: [T, B, S'] float32 exit distribution p(t) per token.
    exit_steps: [B, S'] 0-based loop step whose logits were returned, per token (None for the
      weighted mixture).
    all_step_logits: [T, B, S', V] logits of every step (with `output_all_steps=True`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    exit_pdf: torch.Tensor | None = None
    exit_steps: torch.Tensor | None = None
    all_step_logits: torch.Tensor | None = None


def exit_pdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """Exit distribution [T, ...] in float32 from gate logits [T, ...].

    p_t = lambda_t * prod_{j<t} (1 - lambda_j) for t < T-1; the last step takes the remaining mass.
    """
    g = gate_logits.float()
    survival = torch.cumprod(torch.sigmoid(-g), dim=0)  # S_t = prod_{j<=t} (1 - lambda_j)
    before = torch.cat([torch.ones_like(survival[:1]), survival[:-1]])  # S_{t-1}
    return torch.cat([torch.sigmoid(g[:-1]) * before[:-1], before[-1:]])


def q_exit_steps(gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Q-exit step per token: gate logits [T, ...] -> first step n with CDF(n) >= q, as int64 [...].

    CDF(n) = 1 - S_n, so the test is S_n <= 1 - q, done in float32 log space (log S_n = sum of
    logsigmoid(-g)), which never underflows: q = 1.0 selects the last step for every token.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"exit_threshold must lie in [0, 1], got {threshold}")
    log_survival = torch.cumsum(F.logsigmoid(-gate_logits.float()), dim=0)
    bound = math.log1p(-threshold) if threshold < 1.0 else -math.inf
    reached = log_survival <= bound
    reached[-1] = True  # CDF(T-1) = 1
    return reached.int().argmax(dim=0)  # first step that reached q


# Keyword arguments that transformers' `generate` and `Trainer` pass to `forward` besides the model's
# own: accepted and ignored (`num_items_in_batch`: the loss's token count over gradient accumulation).
_HF_PLUMBING = frozenset({"return_dict", "cache_position", "output_attentions", "output_hidden_states",
                          "num_items_in_batch"})


def _reject_unknown(kwargs: dict) -> None:
    """TypeError naming every keyword argument that is neither the model's nor `_HF_PLUMBING`."""
    unknown = sorted(set(kwargs) - _HF_PLUMBING)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}")


class OuroPreTrainedModel(PreTrainedModel):
    """Weight init and Hugging Face plumbing shared by the Ouro models."""

    config_class = OuroConfig
    base_model_prefix = "model"
    _no_split_modules = ("OuroDecoderLayer",)
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """normal(0, initializer_range) for Linear and Embedding weights, zero biases, ones for norms.

        Uses `torch.nn.init` so transformers 5 can skip parameters it already loaded.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, OuroRMSNorm):
            nn.init.ones_(module.weight)


class OuroModel(OuroPreTrainedModel):
    """The looped decoder: embeddings -> T x (N layers -> model.norm), plus the exit gate."""

    def __init__(self, config: OuroConfig):
        super().__init__(config)
        if config.use_sliding_window:
            raise ValueError("Ouro uses full attention in every layer; use_sliding_window is not supported")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(OuroDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = OuroRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1, bias=True)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> OuroModelOutput:
        """Run all T loop steps for all tokens.

        input_ids [B, S] (or inputs_embeds [B, S, D]); attention_mask [B, K] 2-D padding mask over
        cached + new tokens; position_ids [B, S] (default: from attention_mask, else cache length + i).
        past_key_values: a `DynamicCache` with one slot per (step, layer), slot = step * N + layer; a
        plain `DynamicCache()` grows its slots lazily, and a cache built from the config (N slots, as
        `generate` makes it) is extended to T*N. Keyword arguments of transformers' plumbing
        (`_HF_PLUMBING`, e.g. `return_dict`) are ignored; any other raises TypeError.
        """
        _reject_unknown(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, S, D]
        cfg = self.config
        steps, n_layers = cfg.total_ut_steps, cfg.num_hidden_layers
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if isinstance(past_key_values, DynamicCache):
            while len(past_key_values.layers) < steps * n_layers:
                past_key_values.layers.append(DynamicLayer())
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        seq = h.shape[1]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(past_len, past_len + seq, device=h.device)[None]
        cos, sin = _rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, h.dtype)
        mask = _attention_mask(attention_mask, seq, past_len, h.device)
        states, gates = [], []
        for step in range(steps):
            for i, layer in enumerate(self.layers):
                h = layer(h, cos, sin, mask, past_key_values, step * n_layers + i)
            h = self.norm(h)
            states.append(h)
            gates.append(self.early_exit_gate(h).squeeze(-1))
        return OuroModelOutput(
            last_hidden_state=h,
            past_key_values=past_key_values,
            hidden_states_per_step=torch.stack(states),
            gate_logits=torch.stack(gates),
        )


LOSS_OBJECTIVES = ("released", "stage1")


def _next_token_loss(per_token: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Mean of `per_token` [B, S-1] (the loss of predicting labels[:, 1:]) over the labels that are not
    -100; with `num_items_in_batch` the sum divided by it (transformers' gradient-accumulation form)."""
    mask = labels[:, 1:] != -100
    total = per_token[mask].sum()
    return total / (mask.sum() if num_items_in_batch is None else num_items_in_batch)


def _token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position: logits [..., B, S, V], labels [B, S] -> [..., B, S-1]
    float32 (0 where the label is -100)."""
    targets = labels[:, 1:].to(logits.device)
    logits = logits[..., :-1, :].float()
    targets = targets.expand(logits.shape[:-1]).reshape(-1)
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none", ignore_index=-100)
    return flat.reshape(logits.shape[:-1])


class OuroForCausalLM(OuroPreTrainedModel, GenerationMixin):
    """Ouro with its LM head and early-exit selection; usable with `generate`."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: OuroConfig):
        super().__init__(config)
        self.model = OuroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        exit_at_step: int | None = None,
        exit_threshold: float | None = None,
        use_weighted_exit: bool = False,
        loss_objective: str = "released",
        entropy_beta: float = 0.1,
        output_all_steps: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> OuroCausalLMOutput:
        """Logits of each token's exit step, as the released Ouro code selects them.

        Step selection, first that applies: `exit_at_step` (0-based), else `config.early_exit_step`
        when set; else Q-exit with `exit_threshold`, or `config.early_exit_threshold` when that is None
        (1.0: last step); else, with `use_weighted_exit`, the exit-pdf-weighted mixture of the steps'
        logits sum_t p_t logits_t (`exit_steps` is then None); else the last step. (So with the default
        early_exit_threshold = 1.0, `use_weighted_exit` acts only when the config's threshold is None,
        as in the released code.) All of these can be passed to `generate(...)`.
        logits_to_keep: int n keeps the last n positions (0: all), or a 1-D tensor of positions.

        labels [B, S] (-100: ignored): next-token loss over the kept positions, independent of the step
        selection; the returned `logits` are then the mixture sum_t p_t logits_t whatever the step
        selection (`exit_steps` None), as the released code returns them with `labels`.
        loss_objective "released" (default): the released code's, the cross-entropy of
        the mixture of logits sum_t p_t logits_t; "stage1": the paper's Stage I objective (§3.3,
        Eq. 4), sum_t p_t CE_t - entropy_beta * H(p) per token. Both are means over the labelled
        tokens, or sums divided by `num_items_in_batch` when transformers' Trainer passes it.
        Other arguments as in `OuroModel`; keyword arguments that `generate` / `Trainer` pass
        (`_HF_PLUMBING`) are accepted, any other raises TypeError.
        """
        _reject_unknown(kwargs)
        if loss_objective not in LOSS_OBJECTIVES:
            raise ValueError(f"loss_objective={loss_objective!r} must be one of {LOSS_OBJECTIVES}")
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        states = out.hidden_states_per_step[:, :, keep]  # [T, B, S', D]
        gate_logits = out.gate_logits[:, :, keep]  # [T, B, S']
        pdf = exit_pdf(gate_logits)  # [T, B, S'] float32
        steps = states.shape[0]
        all_step_logits = None
        if labels is not None or output_all_steps or use_weighted_exit:
            all_step_logits = self.lm_head(states)  # [T, B, S', V]
        if exit_at_step is None:
            exit_at_step = getattr(self.config, "early_exit_step", None)
        threshold = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        exit_steps = None
        if exit_at_step is not None:
            if not 0 <= exit_at_step < steps:
                raise ValueError(f"exit_at_step must lie in [0, {steps}), got {exit_at_step}")
            exit_steps = torch.full(gate_logits.shape[1:], exit_at_step, device=states.device)
        elif threshold is not None:
            exit_steps = q_exit_steps(gate_logits, threshold)
        elif not use_weighted_exit:
            exit_steps = torch.full(gate_logits.shape[1:], steps - 1, device=states.device)
        if labels is not None or exit_steps is None:
            exit_steps = None  # with labels the released code returns the mixture it takes the loss of
            logits = torch.einsum("tbsv,tbs->bsv", all_step_logits.float(), pdf)
        else:
            index = exit_steps[None, ..., None].expand(1, *states.shape[1:])
            logits = self.lm_head(states.gather(0, index)[0])  # [B, S', V]
        loss = None
        if labels is not None:
            labels = labels[:, keep]
            items = kwargs.get("num_items_in_batch")
            if loss_objective == "released":
                loss = _next_token_loss(_token_ce(logits, labels), labels, items)
            else:
                entropy = -torch.special.xlogy(pdf, pdf).sum(0)[:, :-1]  # [B, S'-1]
                per_token = (pdf[:, :, :-1] * _token_ce(all_step_logits, labels)).sum(0)
                loss = _next_token_loss(per_token - entropy_beta * entropy, labels, items)
        return OuroCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            exit_pdf=pdf,
            exit_steps=exit_steps,
            all_step_logits=all_step_logits if output_all_steps else None,
        )


__all__ = ["OuroForCausalLM", "OuroModel", "OuroPreTrainedModel", "exit_pdf", "q_exit_steps"]
