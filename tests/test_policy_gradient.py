"""GRPO and PPO arithmetic against direct NumPy computations, one sequence and one token at a time, on crafted
log-probs and rewards: group normalisation, clipping (symmetric and DAPO's asymmetric), KL k3, the three loss
aggregations, GAE, the RLHF per-token rewards and the clipped value loss; and the gradients with respect to
the policy's log-probs against their closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.training import policy_gradient as pg

RNG = np.random.default_rng(0)
B, T = 6, 7
LENGTHS = [7, 3, 5, 1, 6, 4]
MASK = np.array([[1] * n + [0] * (T - n) for n in LENGTHS], np.float32)
OLD = RNG.normal(-2.0, 0.5, (B, T)).astype(np.float32)
LOGP = (OLD + RNG.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios from ~0.5 to ~2: both clips engage
REF = (OLD + RNG.normal(0, 0.2, (B, T))).astype(np.float32)
ADV = np.array([1.5, -0.7, 0.3, -2.0, 0.9, -0.1], np.float32)


def test_group_advantages():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, -1.0, 0.0, 3.0]], np.float32)
    adv, flat = pg.group_advantages(jnp.asarray(rewards))
    for p, group in enumerate(rewards):
        want = (group - group.mean()) / (group.std() + 1e-4)
        np.testing.assert_allclose(adv[p], want, rtol=1e-5, atol=1e-6)
    assert flat.tolist() == [False, True, False]
    unscaled, _ = pg.group_advantages(jnp.asarray(rewards), scale=False)  # Dr. GRPO
    np.testing.assert_allclose(unscaled, rewards - rewards.mean(axis=1, keepdims=True), atol=1e-6)


def _token_terms(lp, old, ref, a, eps_low, eps_high, beta):
    """One token: the surrogate loss, whether it is clipped, k3, and d(loss)/d(logp)."""
    ratio = np.exp(lp - old)
    plain, clipped = ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a
    is_clipped = clipped < plain
    d = ref - lp
    k3 = np.exp(d) - d - 1
    grad = (0.0 if is_clipped else -ratio * a) + beta * (1 - np.exp(d))
    return -min(plain, clipped), is_clipped, k3, grad


@pytest.mark.parametrize("aggregate, eps_high", [("sequence", 0.2), ("token", 0.28), ("constant", 0.2)])
def test_grpo_loss_and_gradient_match_a_direct_computation(aggregate, eps_high):
    beta, eps_low, max_len = 0.04, 0.2, T
    total, tokens, clipped, kl_sum = 0.0, 0, 0, 0.0
    grads = np.zeros((B, T))
    for b in range(B):
        n = LENGTHS[b]
        terms = [_token_terms(LOGP[b, t], OLD[b, t], REF[b, t], ADV[b], eps_low, eps_high, beta) for t in range(n)]
        seq = sum(s + beta * k for s, _, k, _ in terms)
        denom = {"sequence": n, "token": 1, "constant": max_len}[aggregate]
        total += seq / denom
        grads[b, :n] = [g / denom for *_, g in terms]
        tokens += n
        clipped += sum(c for _, c, _, _ in terms)
        kl_sum += sum(k for _, _, k, _ in terms)
    weight = tokens if aggregate == "token" else B

    def loss(lp):
        return pg.grpo_loss(lp, OLD, REF, ADV, MASK, beta, eps_low, eps_high, aggregate, max_len)

    (value, metrics), got_grads = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(LOGP))
    np.testing.assert_allclose(value, total, rtol=1e-5)
    np.testing.assert_allclose(got_grads, grads, rtol=1e-4, atol=1e-7)
    assert float(metrics["weight"]) == weight and float(metrics["tokens"]) == tokens
    np.testing.assert_allclose(metrics["clip_fraction"] / metrics["weight"], clipped / tokens, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"] / metrics["weight"], kl_sum / tokens, rtol=1e-5)
    assert 0 < clipped < tokens  # the crafted ratios exercise both sides


def test_asymmetric_clip_lets_positive_advantages_rise_further():
    lp, old = jnp.log(jnp.array([[1.25]])), jnp.zeros((1, 1))
    up, clipped = pg.clipped_surrogate(lp, old, jnp.array([[1.0]]), 0.2, 0.2)
    dapo, not_clipped = pg.clipped_surrogate(lp, old, jnp.array([[1.0]]), 0.2, 0.28)
    assert bool(clipped[0, 0]) and not bool(not_clipped[0, 0])
    np.testing.assert_allclose([up[0, 0], dapo[0, 0]], [-1.2, -1.25], rtol=1e-6)


def test_gae_matches_the_backward_recursion():
    gamma, lam = 0.97, 0.9
    rewards, values = RNG.normal(size=(B, T)).astype(np.float32), RNG.normal(size=(B, T)).astype(np.float32)
    adv, returns = pg.gae(jnp.asarray(rewards), jnp.asarray(values), MASK, gamma, lam)
    for b in range(B):
        n, running = LENGTHS[b], 0.0
        want = np.zeros(T)
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            running = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * running
            want[t] = running
        np.testing.assert_allclose(adv[b], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(returns[b, :n], want[:n] + values[b, :n], rtol=1e-5, atol=1e-5)
        assert not np.any(np.asarray(returns[b, n:]))


def test_rlhf_rewards_put_the_score_on_the_last_token():
    score, kl_coef = np.array([2.0, -1.0, 0.5, 3.0, 0.0, 1.0], np.float32), 0.1
    got = pg.rlhf_rewards(jnp.asarray(score), LOGP, REF, MASK, kl_coef)
    for b in range(B):
        n = LENGTHS[b]
        want = np.zeros(T)
        want[:n] = -kl_coef * (LOGP[b, :n] - REF[b, :n])
        want[n - 1] += score[b]
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)


def test_clipped_value_loss_and_gradient():
    clip = 0.2
    old = RNG.normal(size=(B, T)).astype(np.float32)
    values = (old + RNG.normal(0, 0.4, (B, T))).astype(np.float32)
    returns = RNG.normal(size=(B, T)).astype(np.float32)
    total, grads = 0.0, np.zeros((B, T))
    for b in range(B):
        for t in range(LENGTHS[b]):
            v, o, r = values[b, t], old[b, t], returns[b, t]
            c = o + np.clip(v - o, -clip, clip)
            plain, clipped = 0.5 * (v - r) ** 2, 0.5 * (c - r) ** 2
            total += max(plain, clipped)
            inside = abs(v - o) < clip
            grads[b, t] = (v - r) if plain >= clipped else ((c - r) if inside else 0.0)
    value, got = jax.value_and_grad(lambda v: pg.value_loss(v, old, returns, MASK, clip))(jnp.asarray(values))
    np.testing.assert_allclose(value, total, rtol=1e-5)
    np.testing.assert_allclose(got, grads, rtol=1e-4, atol=1e-6)
