"""Stage I / Stage II against float64 recomputations, gradient routing, and the memory profile."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ouro_jax import Ouro, objective
from ouro_jax.model import config as cfgs

import oracle
from util import hf_state_dict


def _setup(seed=0, **overrides):
    model = Ouro(cfgs.tiny(**overrides), rngs=nnx.Rngs(seed))
    # a non-trivial gate: bias spread so the exit pdf is far from uniform
    model.early_exit_gate.bias[...] = jnp.array([0.7])
    model.early_exit_gate.kernel[...] = model.early_exit_gate.kernel[...] * 20.0
    key = jax.random.key(seed + 1)
    k1, k2, k3 = jax.random.split(key, 3)
    ids = jax.random.randint(k1, (2, 10), 0, model.config.vocab_size)
    batch = {
        "input_ids": ids,
        "targets": jax.random.randint(k2, (2, 10), 0, model.config.vocab_size),
        "loss_mask": (jax.random.uniform(k3, (2, 10)) > 0.3).astype(jnp.int32),
    }
    ref_logits, ref_gates = oracle.forward(hf_state_dict(model), model.config.to_hf_dict(),
                                           np.asarray(ids))
    ref_ce = oracle.cross_entropy(ref_logits, np.asarray(batch["targets"])[None])  # [T, B, S]
    return model, batch, ref_ce, ref_gates


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_stage1_equals_float64_recomputation(beta):
    model, batch, ce, gates = _setup()
    pdf = oracle.exit_pdf(gates)
    entropy = -np.sum(pdf * np.log(pdf), axis=0)
    mask = np.asarray(batch["loss_mask"], np.float64)
    expected = np.sum((np.sum(pdf * ce, axis=0) - beta * entropy) * mask) / mask.sum()
    loss, metrics = objective.stage1_loss(model, batch, beta=beta)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["ce_per_loop"], (ce * mask).sum((1, 2)) / mask.sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["weighted_ce"], (np.sum(pdf * ce, axis=0) * mask).sum() / mask.sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["exit_pdf_per_loop"], (pdf * mask).sum((1, 2)) / mask.sum(),
                               atol=1e-6)
    np.testing.assert_allclose(metrics["entropy"], (entropy * mask).sum() / mask.sum(), rtol=1e-5)
    loops = np.arange(1, 5)[:, None, None]
    np.testing.assert_allclose(metrics["mean_exit_loop"],
                               ((pdf * loops).sum(0) * mask).sum() / mask.sum(), rtol=1e-5)
    assert float(metrics["num_tokens"]) == mask.sum()


def test_last_loop_weighting_is_the_last_loops_masked_ce():
    model, batch, ce, _ = _setup()
    mask = np.asarray(batch["loss_mask"], np.float64)
    loss, _ = objective.stage1_loss(model, batch, beta=0.1, weighting="last_loop")
    np.testing.assert_allclose(loss, (ce[-1] * mask).sum() / mask.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        objective.stage1_loss(model, batch, weighting="uniform")


@pytest.mark.slow
def test_logit_mixture_is_the_released_codes_labels_loss():
    """CE of sum_t p_t logits_t (HF `OuroForCausalLM` given labels), recomputed in float64."""
    model, batch, _, gates = _setup()
    ids = np.asarray(batch["input_ids"])
    logits, _ = oracle.forward(hf_state_dict(model), model.config.to_hf_dict(), ids)
    mixed = np.sum(oracle.exit_pdf(gates)[..., None] * logits, axis=0)[None]  # [1, B, S, V]
    ce = oracle.cross_entropy(mixed, np.asarray(batch["targets"])[None])[0]
    mask = np.asarray(batch["loss_mask"], np.float64)
    loss, metrics = objective.stage1_loss(model, batch, weighting="logit_mixture")
    np.testing.assert_allclose(loss, (ce * mask).sum() / mask.sum(), rtol=1e-5)
    assert metrics["ce_per_loop"].shape == (4,)
    graphdef, params = nnx.split(model)
    grads = jax.grad(lambda p: objective.stage1_loss(nnx.merge(graphdef, p), batch,
                                                     weighting="logit_mixture")[0])(params)
    assert float(jnp.abs(grads["early_exit_gate"]["kernel"][...]).max()) > 0  # the gate is trained too


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.slow
def test_stage1_gradient_equals_materialised_logits_path(chunk, monkeypatch):
    """The in-loop, rematerialised CE (whole rows, or chunks of 5 of the 10 positions) gives the same
    loss and gradients as the naive [T, B, S, V] path."""
    if chunk is not None:
        monkeypatch.setattr(objective, "CE_CHUNK", chunk)
    model, batch, _, _ = _setup()
    graphdef, params = nnx.split(model)

    def naive(p):
        out = nnx.merge(graphdef, p)(batch["input_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"][None])
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(objective.stage1_token_loss(ce, out.gate_logits, 0.1) * mask) / mask.sum()

    fused = lambda p: objective.stage1_loss(nnx.merge(graphdef, p), batch, beta=0.1)[0]
    g_naive, g_fused = jax.jit(jax.grad(naive))(params), jax.jit(jax.grad(fused))(params)
    np.testing.assert_allclose(jax.jit(naive)(params), jax.jit(fused)(params), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_naive), jax.tree.leaves(g_fused), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    assert float(jnp.abs(g_fused["early_exit_gate"]["kernel"][...]).max()) > 0


@pytest.mark.parametrize("pairing", ["printed", "next"])
def test_stage2_equals_float64_recomputation(pairing):
    model, batch, ce, gates = _setup()
    k, gamma = 50.0, 0.005
    improvement = np.maximum(0.0, ce[:-1] - ce[1:])
    w = 1.0 / (1.0 + np.exp(-k * (improvement - gamma)))
    g = gates[1:] if pairing == "printed" else gates[:-1]
    lam = 1.0 / (1.0 + np.exp(-g))
    bce = -(w * np.log(1.0 - lam) + (1.0 - w) * np.log(lam))  # [T-1, B, S]
    mask = np.asarray(batch["loss_mask"], np.float64)
    expected = np.sum((bce * mask).sum((1, 2)) / mask.sum()) / 4  # divided by T as printed
    loss, _ = objective.stage2_loss(model, batch, pairing=pairing)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_stage2_gradients_reach_only_the_gate():
    model, batch, _, _ = _setup()
    graphdef, params = nnx.split(model)
    grads = jax.grad(lambda p: objective.stage2_loss(nnx.merge(graphdef, p), batch)[0])(params)
    flat = nnx.to_flat_state(grads)
    gate_paths = [path for path, _ in flat if path[0] == "early_exit_gate"]
    assert sorted(gate_paths) == [("early_exit_gate", "bias"), ("early_exit_gate", "kernel")]
    for path, var in flat:
        norm = float(jnp.abs(var[...]).max())
        if path[0] == "early_exit_gate":
            assert norm > 0, path
        else:
            assert norm == 0.0, path


def test_stage1_gradients_reach_every_parameter():
    model, batch, _, _ = _setup()
    graphdef, params = nnx.split(model)
    grads = jax.grad(lambda p: objective.stage1_loss(nnx.merge(graphdef, p), batch)[0])(params)
    for path, var in nnx.to_flat_state(grads):
        assert float(jnp.abs(var[...]).max()) > 0, path


def test_loss_fn_dispatch_and_bad_stage():
    model, batch, _, _ = _setup()
    one, _ = objective.loss_fn(model, batch, {"stage": 1, "beta": 0.05})
    np.testing.assert_allclose(one, objective.stage1_loss(model, batch, beta=0.05)[0])
    with pytest.raises(ValueError, match="stage"):
        objective.loss_fn(model, batch, {"stage": 3})


@functools.cache
def _grad_temp_bytes(num_loops, vocab, naive):
    cfg = cfgs.tiny(vocab_size=vocab, total_ut_steps=num_loops, remat_policy="full")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Ouro(cfg, rngs=nnx.Rngs(0))))
    spec = jax.ShapeDtypeStruct((4, 64), jnp.int32)
    batch = {"input_ids": spec, "targets": spec}

    def loss(p, b):
        model = nnx.merge(graphdef, p)
        if naive:
            out = model(b["input_ids"])
            ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, b["targets"][None])
            return jnp.mean(objective.stage1_token_loss(ce, out.gate_logits, 0.1))
        return objective.stage1_loss(model, b, beta=0.1)[0]

    compiled = jax.jit(jax.grad(loss)).lower(params, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_training_memory_grows_like_one_step_of_logits():
    """Compiled peak temporary memory of the Stage I gradient: the per-step increment does not
    depend on the vocabulary (no step's logits are kept), while materialising all steps does."""
    small, big = 512, 16384
    logits_bytes = 4 * 64 * (big - small) * 4  # one step of the extra float32 logits

    def per_loop(vocab, naive):
        return (_grad_temp_bytes(4, vocab, naive) - _grad_temp_bytes(2, vocab, naive)) / 2

    fused_growth = per_loop(big, False) - per_loop(small, False)
    assert abs(fused_growth) < 0.05 * logits_bytes, fused_growth / logits_bytes
    # the naive path (model(...).logits, then CE) stores every step's logits
    assert per_loop(big, True) > 0.9 * 4 * 64 * big * 4
    # and the whole of it stays within a few single-step logit buffers
    assert _grad_temp_bytes(4, big, False) < 4 * 4 * 64 * big * 4
