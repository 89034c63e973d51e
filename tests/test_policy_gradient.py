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
PROMPTS = [0, 2, 1, 5, 0, 3]  # where each completion starts: after its prompt, as in a rollout's rows
T2 = T + 5
PLACED = np.array([[0] * p + [1] * n + [0] * (T2 - p - n) for p, n in zip(PROMPTS, LENGTHS)], np.float32)
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
    """On completions placed after their prompts, as a rollout's rows hold them."""
    gamma, lam = 0.97, 0.9
    rewards, values = RNG.normal(size=(B, T2)).astype(np.float32), RNG.normal(size=(B, T2)).astype(np.float32)
    adv, returns = pg.gae(jnp.asarray(rewards), jnp.asarray(values), PLACED, gamma, lam)
    for b in range(B):
        p, n, running = PROMPTS[b], LENGTHS[b], 0.0
        want = np.zeros(T2)
        for t in reversed(range(p, p + n)):
            next_value = values[b, t + 1] if t + 1 < p + n else 0.0
            running = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * running
            want[t] = running
        np.testing.assert_allclose(adv[b], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(returns[b, p:p + n], want[p:p + n] + values[b, p:p + n], rtol=1e-5, atol=1e-5)
        assert not np.any(np.asarray(returns[b, :p])) and not np.any(np.asarray(returns[b, p + n:]))


def test_rlhf_rewards_put_the_score_on_the_last_token():
    score, kl_coef = np.array([2.0, -1.0, 0.5, 3.0, 0.0, 1.0], np.float32), 0.1
    logp, ref = RNG.normal(-2, 0.5, (B, T2)).astype(np.float32), RNG.normal(-2, 0.5, (B, T2)).astype(np.float32)
    got = pg.rlhf_rewards(jnp.asarray(score), logp, ref, PLACED, kl_coef)
    for b in range(B):
        p, n = PROMPTS[b], LENGTHS[b]
        want = np.zeros(T2)
        want[p:p + n] = -kl_coef * (logp[b, p:p + n] - ref[b, p:p + n])
        want[p + n - 1] += score[b]  # the completion's last token, after the prompt
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


def test_whiten_over_the_masked_tokens():
    x = RNG.normal(3.0, 2.0, (B, T)).astype(np.float32)
    got = np.asarray(pg.whiten(jnp.asarray(x), MASK))
    inside = x[MASK > 0]
    np.testing.assert_allclose(got[MASK > 0], (inside - inside.mean()) / np.sqrt(inside.var() + 1e-8), rtol=1e-4, atol=1e-5)
    assert not np.any(got[MASK == 0])


def test_ppo_loss_and_gradients_match_a_direct_computation():
    """PPO's total (the per-token clipped surrogate with per-token advantages + vf_coef x the clipped value
    loss) and its gradients with respect to the log-probs and the values, token by token."""
    eps_low, eps_high, clip, vf_coef = 0.2, 0.28, 0.2, 0.1
    adv = RNG.normal(size=(B, T)).astype(np.float32)
    old_v = RNG.normal(size=(B, T)).astype(np.float32)
    values = (old_v + RNG.normal(0, 0.4, (B, T))).astype(np.float32)
    returns = RNG.normal(size=(B, T)).astype(np.float32)
    total, policy, tokens, clipped, v_clipped = 0.0, 0.0, 0, 0, 0
    g_logp, g_values = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        for t in range(LENGTHS[b]):
            s, c, _, g = _token_terms(LOGP[b, t], OLD[b, t], REF[b, t], adv[b, t], eps_low, eps_high, beta=0.0)
            v, o, r = values[b, t], old_v[b, t], returns[b, t]
            cv = o + np.clip(v - o, -clip, clip)
            plain, capped = 0.5 * (v - r) ** 2, 0.5 * (cv - r) ** 2
            total += s + vf_coef * max(plain, capped)
            policy += s
            g_logp[b, t] = g
            g_values[b, t] = vf_coef * ((v - r) if plain >= capped else ((cv - r) if abs(v - o) < clip else 0.0))
            tokens, clipped, v_clipped = tokens + 1, clipped + c, v_clipped + (abs(v - o) > clip)

    def loss(lp, v):
        return pg.ppo_loss(lp, OLD, REF, adv, v, old_v, returns, MASK, eps_low, eps_high, clip, vf_coef)

    (value, metrics), (got_logp, got_values) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(LOGP), jnp.asarray(values))
    np.testing.assert_allclose(value, total, rtol=1e-5)
    np.testing.assert_allclose(metrics["policy_loss"], policy, rtol=1e-5)
    np.testing.assert_allclose(got_logp, g_logp, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got_values, g_values, rtol=1e-4, atol=1e-7)
    assert float(metrics["weight"]) == tokens
    assert float(metrics["clip_fraction"]) == clipped and float(metrics["value_clip_fraction"]) == v_clipped
    assert 0 < clipped < tokens and 0 < v_clipped < tokens
