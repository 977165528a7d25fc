"""Exit distribution and exit policies against hand computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from ouro_jax.model import exits

import oracle


def _logit(p):
    return float(np.log(p) - np.log1p(-p))


# lambdas 0.2, 0.5, 0.9, (0.7 unused at the last loop), one token
LAMBDAS = [0.2, 0.5, 0.9, 0.7]
GATES = jnp.array([[_logit(p)] for p in LAMBDAS])  # [T=4, 1]
HAND_PDF = [0.2, 0.8 * 0.5, 0.8 * 0.5 * 0.9, 0.8 * 0.5 * 0.1]  # 0.2, 0.4, 0.36, 0.04
HAND_CDF = [0.2, 0.6, 0.96, 1.0]


def test_pdf_and_cdf_match_hand_computation():
    pdf = exits.exit_pdf(GATES)[:, 0]
    assert pdf.dtype == jnp.float32
    np.testing.assert_allclose(pdf, HAND_PDF, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(pdf), 1.0, atol=1e-6)
    np.testing.assert_allclose(exits.exit_cdf(GATES)[:, 0], HAND_CDF, atol=1e-6)
    np.testing.assert_allclose(exits.exit_lambdas(GATES)[:, 0], LAMBDAS, atol=1e-6)


def test_pdf_sums_to_one_for_random_and_extreme_gates():
    rng = np.random.default_rng(0)
    gates = jnp.asarray(rng.normal(0, 3, (5, 7, 11)), jnp.float32)
    gates = gates.at[:, 0, 0].set(60.0).at[:, 0, 1].set(-60.0)  # saturated sigmoids
    pdf = exits.exit_pdf(gates)
    assert np.all(np.isfinite(pdf)) and np.all(pdf >= 0)
    np.testing.assert_allclose(jnp.sum(pdf, axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(pdf, oracle.exit_pdf(np.asarray(gates)), atol=1e-6)
    np.testing.assert_allclose(pdf[:, 0, 0], [1, 0, 0, 0, 0], atol=1e-6)  # exits at once
    np.testing.assert_allclose(pdf[:, 0, 1], [0, 0, 0, 0, 1], atol=1e-6)  # never exits early
    assert np.all(np.isfinite(exits.exit_entropy(gates)))


def test_bfloat16_gates_give_float32_exits():
    pdf = exits.exit_pdf(GATES.astype(jnp.bfloat16))
    assert pdf.dtype == jnp.float32
    np.testing.assert_allclose(jnp.sum(pdf), 1.0, atol=1e-6)


@pytest.mark.parametrize("q, loop_index", [
    (0.0, 0), (1e-9, 0), (0.2, 0), (0.2001, 1), (0.5, 1), (0.6, 1), (0.95, 2), (0.96, 2),
    (0.97, 3), (1.0, 3)])
def test_q_exit_is_first_loop_whose_cdf_reaches_q(q, loop_index):
    assert int(exits.q_exit_loop(GATES, q)[0]) == loop_index


def test_q_exit_one_uses_last_loop_even_when_cdf_rounds_to_one():
    # lambda_1 = sigmoid(30): 1 - S_1 is exactly 1.0 in float32, yet q = 1 must use the last loop.
    gates = jnp.array([[30.0], [0.0], [0.0]])
    assert float(exits.exit_cdf(gates)[0, 0]) == 1.0
    assert int(exits.q_exit_loop(gates, 1.0)[0]) == 2
    assert int(exits.q_exit_loop(gates, 0.999)[0]) == 0


def test_q_exit_per_token():
    gates = jnp.stack([jnp.array([5.0, -5.0, -5.0]), jnp.array([0.0, 5.0, -5.0]),
                       jnp.array([0.0, 0.0, -5.0])])  # [T=3, tokens=3]
    np.testing.assert_array_equal(exits.q_exit_loop(gates, 0.9), [0, 1, 2])


def test_select_loop_gathers_per_token():
    per_loop = jnp.arange(3 * 2 * 4 * 5, dtype=jnp.float32).reshape(3, 2, 4, 5)  # [T, B, S, V]
    loop = jnp.array([[0, 1, 2, 1], [2, 2, 0, 0]])
    picked = exits.select_loop(per_loop, loop)
    for b in range(2):
        for s in range(4):
            np.testing.assert_array_equal(picked[b, s], per_loop[loop[b, s], b, s])
    np.testing.assert_array_equal(exits.select_loop(per_loop, 1), per_loop[1])


def test_select_loop_gathers_per_row_on_a_later_axis():
    per_loop = jnp.arange(3 * 2 * 4 * 5, dtype=jnp.float32).reshape(3, 2, 4, 5)  # [T, N, B, H]
    loop = jnp.array([2, 0, 1, 2])  # [B]
    picked = exits.select_loop(per_loop, loop, axis=2)
    assert picked.shape == (2, 4, 5)
    for b in range(4):
        np.testing.assert_array_equal(picked[:, b], per_loop[loop[b], :, b])


def test_weighted_logits_entropy_and_expected_loop():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 1, 1, 6)), jnp.float32)
    pdf = exits.exit_pdf(GATES[:, :, None])  # [4, 1, 1]
    mixed = exits.weighted_logits(logits, pdf)
    np.testing.assert_allclose(mixed[0, 0], sum(p * logits[t, 0, 0] for t, p in enumerate(HAND_PDF)),
                               atol=1e-6)
    hand_entropy = -sum(p * np.log(p) for p in HAND_PDF)
    np.testing.assert_allclose(exits.exit_entropy(GATES)[0], hand_entropy, atol=1e-6)
    hand_mean = sum((t + 1) * p for t, p in enumerate(HAND_PDF))  # 2.24
    np.testing.assert_allclose(exits.expected_exit_loop(exits.exit_pdf(GATES))[0], hand_mean,
                               atol=1e-6)
