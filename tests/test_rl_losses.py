"""Advantages and losses of ouro_jax.rl.losses against float64 hand computations (NumPy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouro_jax.rl import losses

REWARDS = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]])
LOGP = np.array([[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.5]])
OLD = np.array([[-1.1, -1.5, -0.5], [-0.4, -3.0, -0.1]])
MASK = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = np.array([0.7, -1.3])


def close(actual, expected, rtol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=1e-7)


def test_zero_variance_groups():
    np.testing.assert_array_equal(losses.zero_variance(jnp.asarray(REWARDS)), [False, True, False])


def test_advantages_group_mean_and_std():
    r = jnp.asarray(REWARDS)
    close(losses.advantages(r), [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.375, -0.375, 0.125, 0.625]])
    # group std, unbiased: group 0 sqrt(1/3); group 2: deviations -3/8, -3/8, 1/8, 5/8 -> sum sq 44/64 / 3
    s0, s2 = np.sqrt(1 / 3), np.sqrt(44 / 64 / 3)
    close(losses.advantages(r, "group"), [[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [0, 0, 0, 0],
                                          [-0.375 / s2, -0.375 / s2, 0.125 / s2, 0.625 / s2]], rtol=1e-5)
    batch_std = np.sqrt(np.mean((REWARDS - REWARDS.mean()) ** 2))
    close(losses.advantages(r, "batch"), (REWARDS - REWARDS.mean(1, keepdims=True)) / batch_std, rtol=1e-5)
    with pytest.raises(ValueError, match="std="):
        losses.advantages(r, "rows")


def test_grpo_clipped_ratio_value_and_gradient():
    eps = 0.2
    ratio = np.exp(LOGP - OLD)
    a = ADV[:, None]
    per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    expected = (per_token * MASK).sum() / MASK.sum()
    loss, stats = losses.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK),
                                     kind="grpo", eps_low=eps, eps_high=eps)
    close(loss, expected)
    # Gradient: -A rho / n where the unclipped term is the minimum, 0 where the clipped one is.
    unclipped = ratio * a <= np.clip(ratio, 1 - eps, 1 + eps) * a
    grad = jax.grad(lambda lp: losses.policy_loss(lp, jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK),
                                                  kind="grpo")[0])(jnp.asarray(LOGP))
    close(grad, np.where(unclipped, -a * ratio, 0.0) * MASK / MASK.sum(), rtol=1e-5)
    assert (~unclipped & (MASK > 0)).any() and (unclipped & (MASK > 0)).any()  # both branches taken
    close(stats["clip_fraction"], ((~unclipped) * MASK).sum() / MASK.sum())


def test_cispo_truncated_stop_gradient_weight():
    cap = 1.1
    ratio = np.exp(LOGP - OLD)
    w = np.minimum(ratio, cap)
    a = ADV[:, None]
    loss, stats = losses.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK),
                                     kind="cispo", cispo_max=cap)
    close(loss, (-w * a * LOGP * MASK).sum() / MASK.sum())
    grad = jax.grad(lambda lp: losses.policy_loss(lp, jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK),
                                                  kind="cispo", cispo_max=cap)[0])(jnp.asarray(LOGP))
    close(grad, -w * a * MASK / MASK.sum(), rtol=1e-5)  # the weight is not differentiated
    assert (ratio > cap).any()
    close(stats["clip_fraction"], ((ratio > cap) * MASK).sum() / MASK.sum())


def test_on_policy_ratio_one_is_reinforce():
    """rho = 1: GRPO and CISPO both have the REINFORCE gradient -A / n per token."""
    for kind in losses.LOSSES:
        loss = lambda lp, kind=kind: losses.policy_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(ADV),
                                                        jnp.asarray(MASK), kind=kind)[0]
        grad = jax.grad(loss)(jnp.asarray(LOGP))
        close(grad, -ADV[:, None] * MASK / MASK.sum(), rtol=1e-5)


def test_constant_aggregation_is_dr_grpo():
    per_token = np.arange(6.0).reshape(2, 3)
    close(losses.aggregate(jnp.asarray(per_token), jnp.asarray(MASK), "constant"),
          (per_token * MASK).sum() / 6)
    close(losses.aggregate(jnp.asarray(per_token), jnp.asarray(MASK)), (per_token * MASK).sum() / 5)


def test_k3_kl():
    ref = np.array([[-1.3, -2.0, -0.1]])
    lp = np.array([[-1.0, -2.5, -0.2]])
    d = ref - lp
    close(losses.k3_kl(jnp.asarray(lp), jnp.asarray(ref)), np.exp(d) - d - 1)
    assert float(jnp.min(losses.k3_kl(jnp.asarray(lp), jnp.asarray(ref)))) >= 0
    close(losses.k3_kl(jnp.asarray(lp), jnp.asarray(lp)), np.zeros_like(lp))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_exit_logprob_hand_formula():
    """log p(e) = sum_{j<e} log(1 - lambda_j) + [e < T] log lambda_e, every e of T = 4."""
    gates = np.array([[0.3, -1.0], [-2.0, 0.5], [1.5, 0.2], [0.7, -0.4]])[:, None, :]  # [T, B=1, M=2]
    lam = _sigmoid(gates[:, 0, :])
    for e in range(4):
        expected = np.log(1 - lam[:e]).sum(0) + (np.log(lam[e]) if e < 3 else 0.0)
        close(losses.exit_logprob(jnp.asarray(gates), jnp.full((1, 2), e)), expected[None], rtol=1e-5)
    # it is a distribution over e
    total = sum(np.exp(np.asarray(losses.exit_logprob(jnp.asarray(gates), jnp.full((1, 2), e)),
                                  np.float64)) for e in range(4))
    close(total, np.ones((1, 2)), rtol=1e-6)


def test_loop_credit_weights():
    loop_lp = np.array([[-1.0], [-2.0], [-4.0]])[:, None, :]  # [T=3, B=1, M=1]
    e = jnp.array([[1]])
    close(losses.loop_credit(jnp.asarray(loop_lp), e, "uniform"), [[-1.5]])
    gates = np.array([[0.0], [1.0], [2.0]])[:, None, :]
    lam = _sigmoid(gates[:, 0, 0])
    p = np.array([lam[0], (1 - lam[0]) * lam[1]])
    close(losses.loop_credit(jnp.asarray(loop_lp), e, "exit_pdf", jnp.asarray(gates)),
          [[(p[0] * -1.0 + p[1] * -2.0) / p.sum()]], rtol=1e-5)


def test_depth_cost():
    rewards = np.array([1.0, 0.0])
    loops = np.array([[1, 3, 4], [2, 2, 0]])
    close(losses.depth_cost(jnp.asarray(rewards), jnp.asarray(loops), jnp.asarray(MASK), 0.1),
          [1.0 - 0.1 * 2.0, 0.0 - 0.1 * 4 / 3])
