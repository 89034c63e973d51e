"""The arithmetic of learning from rewards (GRPO, PPO), as pure functions of log-probs, rewards and masks.

Shapes: B sequences, T completion tokens; `mask` (B, T) marks the completion's real tokens. Log-probs are
per token: `logp` the policy being trained, `old_logp` the policy that sampled the rollout, `ref_logp`
the frozen reference.

- GRPO (Shao et al. 2024): advantages normalised within each prompt's group of G samples; the clipped
  per-token ratio objective with a KL penalty to the reference (the k3 estimator, Schulman 2020). Switches:
  Dr. GRPO (Liu et al. 2025) neither divides by the group's std nor by each completion's length (a constant
  instead); DAPO (Yu et al. 2025) clips the ratio asymmetrically (`eps_high`) and averages over tokens.
- PPO as RLHF uses it (Ouyang et al. 2022): per-token rewards of -kl_coef * (logp - ref_logp) with the
  reward model's score added at the completion's last token; GAE(gamma, lambda) advantages against a value
  head; the clipped value loss.

Every loss returns sums and the weight they are over, like the training objectives
(`jaxlm.training.objectives`), so micro-batches and devices combine by adding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_advantages(rewards_pg: jax.Array, scale: bool = True, eps: float = 1e-4) -> tuple[jax.Array, jax.Array]:
    """(advantages (P, G), zero-variance groups (P,)): each reward minus its group's mean, divided by the
    group's standard deviation (+ eps) when `scale` (GRPO; Dr. GRPO does not divide)."""
    centred = rewards_pg - rewards_pg.mean(axis=1, keepdims=True)
    std = rewards_pg.std(axis=1, keepdims=True)
    flat = (std[:, 0] == 0)
    return (centred / (std + eps) if scale else centred), flat


def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from samples of the policy: exp(d) - d - 1 with
    d = ref_logp - logp; unbiased and never negative."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, eps_low: float,
                      eps_high: float) -> tuple[jax.Array, jax.Array]:
    """(per-token loss, per-token clipped flag): -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A),
    ratio = exp(logp - old_logp); clipped where the clipped term is the smaller (its gradient is zero)."""
    ratio = jnp.exp(logp - old_logp)
    plain, clipped = ratio * advantages, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return -jnp.minimum(plain, clipped), clipped < plain


def grpo_loss(logp, old_logp, ref_logp, advantages_b, mask, beta: float, eps_low: float, eps_high: float,
              aggregate: str = "sequence", max_len: int = 0) -> tuple[jax.Array, dict]:
    """(summed loss, metrics of sums with "weight") of GRPO for one batch of completions.

    `aggregate`: "sequence" averages each completion's tokens, then sums over completions (GRPO; weight =
    completions); "token" sums every token (DAPO; weight = tokens); "constant" divides each completion's
    token sum by `max_len` (Dr. GRPO, length-unbiased; weight = completions)."""
    m = mask.astype(jnp.float32)
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages_b[:, None], eps_low, eps_high)
    kl = kl_k3(logp, ref_logp)
    per_token = surrogate + beta * kl
    lengths = m.sum(axis=1)
    if aggregate == "sequence":
        per_seq = (per_token * m).sum(axis=1) / jnp.maximum(lengths, 1.0)
        total, weight = per_seq.sum(), jnp.asarray(mask.shape[0], jnp.float32)
    elif aggregate == "token":
        total, weight = (per_token * m).sum(), lengths.sum()
    elif aggregate == "constant":
        total, weight = (per_token * m).sum() / max_len, jnp.asarray(mask.shape[0], jnp.float32)
    else:
        raise ValueError(f"aggregate={aggregate!r}: use sequence, token or constant")
    # The diagnostics are per token whatever the aggregation, scaled to the loss's weight.
    per = weight / jnp.maximum(lengths.sum(), 1.0)
    metrics = {"loss": total, "weight": weight, "kl": (kl * m).sum() * per,
               "clip_fraction": (clipped * m).sum() * per, "tokens": lengths.sum()}
    return total, metrics


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) (B, T) by generalised advantage estimation. The completion ends at its last
    masked token: the value after it is 0, and positions outside the mask get 0."""
    m = mask.astype(jnp.float32)
    next_values = jnp.concatenate([values[:, 1:] * m[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values - values) * m

    def back(carry, xs):
        delta, keep = xs
        adv = delta + gamma * lam * carry * keep
        return adv, adv

    _, adv = jax.lax.scan(back, jnp.zeros(rewards.shape[0]), (deltas.T[::-1], m.T[::-1]))
    adv = adv[::-1].T * m
    return adv, (adv + values) * m


def rlhf_rewards(score_b: jax.Array, logp, ref_logp, mask, kl_coef: float) -> jax.Array:
    """Per-token rewards (B, T): -kl_coef * (logp - ref_logp) on every completion token, plus the reward
    model's score on the last one."""
    m = mask.astype(jnp.float32)
    last = mask.shape[1] - 1 - jnp.argmax(m[:, ::-1], axis=1)  # the last masked position (after the prompt's)
    at_end = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * score_b[:, None]
    return (-kl_coef * (logp - ref_logp) + at_end) * m


def value_loss(values, old_values, returns, mask, clip: float) -> jax.Array:
    """Summed clipped value loss: 0.5 * max((v - R)^2, (old_v + clip(v - old_v, -clip, clip) - R)^2)."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    per_token = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (per_token * mask.astype(jnp.float32)).sum()


def whiten(x, mask, eps: float = 1e-8) -> jax.Array:
    """x normalised to mean 0 and std 1 over the masked entries (PPO's advantages, batch-wide); 0 elsewhere."""
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * jax.lax.rsqrt(var + eps) * m


def ppo_loss(logp, old_logp, ref_logp, advantages, values, old_values, returns, mask, eps_low: float,
             eps_high: float, value_clip: float, vf_coef: float) -> tuple[jax.Array, dict]:
    """(summed loss, metrics of sums with "weight" = completion tokens) of PPO for one batch: the clipped
    per-token surrogate with per-token (GAE) advantages, plus vf_coef times the clipped value loss. The KL to
    the reference is already in the rewards (`rlhf_rewards`); "kl" here (k3) is a diagnostic."""
    m = mask.astype(jnp.float32)
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    policy = (surrogate * m).sum()
    critic = value_loss(values, old_values, returns, mask, value_clip)
    value_clipped = jnp.abs(values - old_values) > value_clip
    total = policy + vf_coef * critic
    metrics = {"loss": total, "weight": m.sum(), "tokens": m.sum(), "policy_loss": policy, "value_loss": critic,
               "kl": (kl_k3(logp, ref_logp) * m).sum(), "clip_fraction": (clipped * m).sum(),
               "value_clip_fraction": (value_clipped * m).sum()}
    return total, metrics
