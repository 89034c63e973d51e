"""Objectives: what a training mode minimises, as the one thing that differs between modes.

An objective's `loss(params, batch, rng) -> (value, metrics)` returns sums over the batch, never means:
- `value` is what is differentiated (it may include regularisers such as the z-loss);
- `metrics["weight"]` is how many units the sums are over (tokens trained on, preference pairs, ...);
- `metrics["loss"]` is the loss to report, summed;
- any other metric is a sum too: the step and the eval loop divide it by the total weight, except those
  named in `TOTALS`, which are reported as totals.
Because everything is a sum, micro-batches, devices and eval batches combine by adding, and a step over
K micro-batches equals one over the whole batch. `rng` is None when evaluating (no dropout).

Pretraining's next-token loss is here; SFT's and DPO's live beside their data (`jaxlm.training.sft`,
`jaxlm.training.dpo`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.model import moe
from jaxlm.model.architectures import MODEL_INPUTS

from jaxlm.training.losses import head_logits, masked_sums, resolve_chunks, tiled_token_losses, token_losses

TOTALS = ("tokens", "weight")  # summed over the batch and reported as sums; every other metric is a mean


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable  # (params, batch, rng | None) -> (value, metrics of sums)
    per_token: bool = True  # the loss is a mean per token, so evals also report perplexity


def forward(apply_fn: Callable, params, batch, rng=None, dropout: bool = False, prefix: str = "", **kwargs):
    """The model's logits for `batch` (keys inputs/positions/segment_ids, and those of `MODEL_INPUTS` it
    has, each behind `prefix`)."""
    if dropout and rng is not None:
        kwargs["rngs"] = {"dropout": rng}
    kwargs.update({k: batch[prefix + k] for k in MODEL_INPUTS if prefix + k in batch})
    return apply_fn({"params": params}, batch[f"{prefix}inputs"], batch[f"{prefix}positions"],
                    batch[f"{prefix}segment_ids"], **kwargs)


class TokenLosses(NamedTuple):
    logz: jax.Array  # (B, T) float32 logsumexp of the logits
    nll: jax.Array  # (B, T) float32 -log p(target)
    router: dict | None  # a mixture-of-experts model's router statistics (`moe.collect_stats`); None if dense
    values: jax.Array | None  # (B, T) float32 a value head's (model.value_head, PPO); None without one


def per_token_losses(apply_fn: Callable, params, batch, targets, rng=None, dropout: bool = False,
                     loss_chunks: int = 0) -> TokenLosses:
    """Per-token losses of `batch` and what the same forward pass sows (router statistics, values). The
    logits are formed whole, or that many sequence pieces at a time (`losses.tiled_token_losses`);
    `loss_chunks=0` decides by their size per device."""
    (h_btd, head_vd), state = forward(apply_fn, params, batch, rng, dropout, hidden=True, mutable=["intermediates"])
    sown = state.get("intermediates", {})
    router = moe.collect_stats({k: v for k, v in sown.items() if k != "values"})
    values = sown["values"][0] if "values" in sown else None
    chunks = resolve_chunks(loss_chunks, *targets.shape, head_vd.shape[0])
    if chunks == 1:
        return TokenLosses(*token_losses(head_logits(h_btd, head_vd), targets), router, values)
    return TokenLosses(*tiled_token_losses(h_btd, head_vd, targets, chunks), router, values)


def router_terms(router: dict | None, weight) -> tuple[jax.Array, dict]:
    """(penalty, metrics) of a MoE model's router statistics, as sums over `weight` units like every other
    objective term: the weighted load-balancing and z losses averaged over the MoE layers, and per layer
    the busiest and idlest expert's load (1 = an even share) and the fraction of assignments dropped."""
    if router is None:
        return jnp.zeros((), jnp.float32), {}
    experts = router["load"].shape[-1]
    metrics = {"moe/balance_loss": jnp.mean(router["balance"]), "moe/z_loss": jnp.mean(router["z"]),
               "moe/dropped": jnp.mean(router["dropped"])}
    for i in range(router["load"].shape[0]):
        metrics[f"moe/load_max/moe_layer{i}"] = experts * jnp.max(router["load"][i])
        metrics[f"moe/load_min/moe_layer{i}"] = experts * jnp.min(router["load"][i])
        metrics[f"moe/dropped/moe_layer{i}"] = router["dropped"][i]
    return jnp.mean(router["loss"]) * weight, {k: v * weight for k, v in metrics.items()}


def next_token(apply_fn: Callable, z_loss: float = 0.0, dropout: bool = False, loss_chunks: int = 0) -> Objective:
    """Causal LM: cross-entropy of every target the batch's loss mask marks (pretraining and SFT alike;
    SFT's mask marks the assistant's tokens only)."""

    def loss(params, batch, rng):
        logz, nll, router, _ = per_token_losses(apply_fn, params, batch, batch["targets"], rng, dropout, loss_chunks)
        nll, zl, count = masked_sums(logz, nll, batch["loss_mask"], z_loss)
        tokens = sum(jnp.sum(batch[k] > 0) for k in ("segment_ids", "decoder_segment_ids") if k in batch)
        tokens = tokens.astype(jnp.float32)
        penalty, router_metrics = router_terms(router, count)
        return nll + zl + penalty, {"loss": nll, "weight": count, "tokens": tokens, **router_metrics}

    return Objective("next_token", loss)
