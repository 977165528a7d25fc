"""Helpers shared by the tests: NNX state -> HF-named NumPy dict, an unrolled Python forward, a command
run until its metrics.jsonl reaches a length, then signalled, and the environment of a long command."""

import os
import re
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """The model's parameters under the released HF names and [out, in] layouts (float64)."""
    cfg = model.config
    f64 = lambda x: np.asarray(x[...], np.float64)
    sd = {
        "model.embed_tokens.weight": f64(model.embed_tokens.embedding),
        "model.norm.weight": f64(model.norm.weight),
        "model.early_exit_gate.weight": f64(model.early_exit_gate.kernel).T,
        "model.early_exit_gate.bias": f64(model.early_exit_gate.bias),
    }
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = f64(model.lm_head.kernel).T
    layers = model.layers
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = layers.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            kernel = f64(getattr(attn, name).kernel)[i]  # [D, heads, H]
            sd[p + f"self_attn.{name}.weight"] = kernel.reshape(kernel.shape[0], -1).T
        o = f64(attn.o_proj.kernel)[i]  # [N, H, D]
        sd[p + "self_attn.o_proj.weight"] = o.reshape(-1, o.shape[-1]).T
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{name}.weight"] = f64(getattr(layers.mlp, name).kernel)[i].T
        for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                     "post_attention_layernorm_2"):
            sd[p + f"{name}.weight"] = f64(getattr(layers, name).weight)[i]
    return sd


def unrolled_forward(model, input_ids, num_loops):
    """Python loops over loops and layers (no scan), reusing the model's own layer modules.

    Returns (logits [T, B, S, V], gate_logits [T, B, S]).
    """
    from ouro_jax.model.layers import rope_cos_sin

    cfg = model.config
    graphdef, stacked = nnx.split(model.layers)
    layers = [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], stacked))
              for i in range(cfg.num_hidden_layers)]
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.compute_jnp_dtype)
    h = model.embed(input_ids)
    logits, gates = [], []
    for _ in range(num_loops):
        for layer in layers:
            h = layer(h, cos, sin, None)
        h = model.norm(h)
        logits.append(model.logits(h))
        gates.append(model.gate_logit(h))
    return jnp.stack(logits), jnp.stack(gates)


def assert_same_decoding(expected, actual):
    """Two `generate` outputs agree: tokens, exit loops, lengths, and every cache entry a later token
    could read."""
    np.testing.assert_array_equal(actual.tokens, expected.tokens)
    np.testing.assert_array_equal(actual.exit_loops, expected.exit_loops)
    np.testing.assert_array_equal(actual.lengths, expected.lengths)
    # Decoded position j holds token j's K/V, defined when token j + 1 was generated (else the row had
    # stopped and the entry is never read); every loop's slot is defined (computed or filled).
    defined = expected.exit_loops[:, 1:] > 0  # [B, M - 1]
    for ours, theirs in ((actual.cache.decode_k, expected.cache.decode_k),
                         (actual.cache.decode_v, expected.cache.decode_v)):
        for x, y in zip(ours, theirs, strict=True):
            x, y = np.asarray(x)[:, :, :-1], np.asarray(y)[:, :, :-1]  # [B, K, M - 1, H]
            np.testing.assert_allclose(x.transpose(0, 2, 1, 3)[defined], y.transpose(0, 2, 1, 3)[defined],
                                       rtol=1e-5, atol=1e-6)


def exported_gated_model(directory, *, vocab_size, context, tokenizer):
    """A random one-layer Ouro (T = 3, gate scaled so that tokens exit at various loops under Q-exit),
    exported in float32 with `tokenizer` to `directory`; returns its path."""
    from ouro_jax.convert.pretrained import save_pretrained
    from ouro_jax.model.config import tiny
    from ouro_jax.model.ouro import Ouro

    model = Ouro(tiny(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=context, total_ut_steps=3), rngs=nnx.Rngs(1))
    kernel = model.early_exit_gate.kernel
    kernel[...] = 4.0 * jax.random.normal(jax.random.key(2), kernel.shape) / np.sqrt(32)
    return str(save_pretrained(model, directory, dtype="float32", tokenizer=tokenizer))


def optimized_env(**extra: str) -> dict[str, str]:
    """os.environ for a command that trains for hundreds of steps: XLA's CPU backend optimised (the suite
    compiles at level 0, conftest.py), so that its steps run at full speed."""
    flags = re.sub(r"--xla_backend_optimization_level=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return {**os.environ, "XLA_FLAGS": flags.strip(), **extra}


def run_until(args, workdir, lines, sig):
    """Start a training command, send it `sig` once its metrics.jsonl holds at least `lines` lines, wait;
    returns (exit code, lines written). The run must be long enough never to finish first."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(workdir, "metrics.jsonl")
    count = lambda: sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and count() < lines:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its signal"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc.returncode, count()
