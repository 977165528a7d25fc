"""An independent float64 NumPy Ouro forward, written from the paper (arXiv:2510.25741 §3) and the released
Hugging Face layout (state-dict names, Linear weights as [out, in]). It shares no code with ouro_jax.
"""

import numpy as np


def _rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _attention(x, sd, prefix, cfg, positions, allowed):
    bsz, seq, _ = x.shape
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = (x @ sd[prefix + "q_proj.weight"].T).reshape(bsz, seq, nh, hd).transpose(0, 2, 1, 3)
    k = (x @ sd[prefix + "k_proj.weight"].T).reshape(bsz, seq, nkv, hd).transpose(0, 2, 1, 3)
    v = (x @ sd[prefix + "v_proj.weight"].T).reshape(bsz, seq, nkv, hd).transpose(0, 2, 1, 3)
    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    freqs = positions[:, :, None].astype(np.float64) * inv_freq  # [B, S, hd/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None]  # [B, 1, S, hd]
    cos, sin = np.cos(emb), np.sin(emb)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    groups = nh // nkv
    k = np.repeat(k, groups, axis=1)
    v = np.repeat(v, groups, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    scores = np.where(allowed[:, None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, seq, nh * hd)
    return out @ sd[prefix + "o_proj.weight"].T


def _mlp(x, sd, prefix):
    gate = x @ sd[prefix + "gate_proj.weight"].T
    up = x @ sd[prefix + "up_proj.weight"].T
    return (gate / (1.0 + np.exp(-gate)) * up) @ sd[prefix + "down_proj.weight"].T


def forward(sd, cfg, input_ids, num_loops=None, positions=None, segment_ids=None):
    """Returns (logits [T, B, S, V], gate_logits [T, B, S]) in float64.

    sd: HF-named float64 arrays; cfg: config.json-style dict with head_dim resolved.
    """
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    eps = cfg["rms_norm_eps"]
    bsz, seq = input_ids.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(seq), (bsz, seq))
    if segment_ids is None:
        segment_ids = np.zeros((bsz, seq), np.int64)
    causal = np.tril(np.ones((seq, seq), bool))
    allowed = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    lm_head = sd["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    h = sd["model.embed_tokens.weight"][input_ids]
    all_logits, all_gates = [], []
    for _ in range(num_loops or cfg["total_ut_steps"]):
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            a = _attention(_rms_norm(h, sd[p + "input_layernorm.weight"], eps), sd, p + "self_attn.",
                           cfg, positions, allowed)
            h = h + _rms_norm(a, sd[p + "input_layernorm_2.weight"], eps)
            m = _mlp(_rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps), sd, p + "mlp.")
            h = h + _rms_norm(m, sd[p + "post_attention_layernorm_2.weight"], eps)
        h = _rms_norm(h, sd["model.norm.weight"], eps)
        all_logits.append(h @ lm_head.T)
        gate = h @ sd["model.early_exit_gate.weight"].T + sd["model.early_exit_gate.bias"]
        all_gates.append(gate[..., 0])
    return np.stack(all_logits), np.stack(all_gates)


def exit_pdf(gate_logits):
    """float64 exit pmf from gate logits [T, ...]: lambda_t prod_{j<t}(1 - lambda_j), remainder last."""
    lam = 1.0 / (1.0 + np.exp(-np.asarray(gate_logits, np.float64)))
    pdf, survive = [], np.ones_like(lam[0])
    for t in range(lam.shape[0] - 1):
        pdf.append(lam[t] * survive)
        survive = survive * (1.0 - lam[t])
    pdf.append(survive)
    return np.stack(pdf)


def cross_entropy(logits, targets):
    """Per-token CE in float64: logits [..., V], targets [...] -> [...]."""
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def slow_phop_target(x, i, p):
    """x at f^p(i) with f(i) = 1 + max{j < i : x_j = x_i}, by linear scans; None when undefined."""
    for _ in range(p):
        earlier = [j for j in range(i) if x[j] == x[i]]
        if not earlier:
            return None
        i = earlier[-1] + 1
    return x[i]
