"""Reward models: a scalar head (`model.num_labels=1`) on the LM backbone, trained on preference pairs
(the DPO JSONL: prompt, chosen, rejected) with the Bradley-Terry loss

    loss = -log sigmoid(r(prompt + chosen) - r(prompt + rejected))

where r is the head's output at the last token of the whole conversation, as Hugging Face's
*ForSequenceClassification pools it. Held-out pair accuracy (r_chosen > r_rejected) is the eval metric.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import chat
from jaxlm.model import moe
from jaxlm.training.dpo import SIDES, encode_pair
from jaxlm.training.objectives import Objective, forward, router_terms
from jaxlm.training.sft import Report, usable


def build_rows(rows, template: chat.Template, encode: Callable, seq_len: int, report: Report) -> dict[str, np.ndarray]:
    """Arrays per side: {side}_inputs/_positions/_segment_ids (N, seq_len), the whole conversation from
    position 0, and {side}_last (N,), the index of its last token. Rows over seq_len tokens are counted."""
    encode_row = lambda row: encode_pair(row, template, encode)
    # `usable` allows seq_len + 1 tokens (inputs and shifted targets); a score reads every token itself.
    pairs = [pair for _, pair in usable(rows, encode_row, lambda p: max(len(t) for t, _ in p.values()) + 1,
                                        seq_len, report)]
    out = {}
    for side in SIDES:
        arr = {k: np.zeros((len(pairs), seq_len), np.int32) for k in ("inputs", "positions", "segment_ids")}
        last = np.zeros(len(pairs), np.int32)
        for r, pair in enumerate(pairs):
            tokens, _ = pair[side]
            arr["inputs"][r, :len(tokens)] = tokens
            arr["positions"][r, :len(tokens)] = np.arange(len(tokens))
            arr["segment_ids"][r, :len(tokens)] = 1
            last[r] = len(tokens) - 1
        out.update({f"{side}_{k}": v for k, v in arr.items()})
        out[f"{side}_last"] = last
    return out


def scores(apply_fn: Callable, params, batch: dict, rng=None, dropout: bool = False) -> dict:
    """{side: (B,) float32 reward}, both sides in one forward pass, and the router statistics (MoE)."""
    cat = lambda key: jnp.concatenate([batch[f"{s}_{key}"] for s in SIDES])
    both = {k: cat(k) for k in ("inputs", "positions", "segment_ids")}
    logits, state = forward(apply_fn, params, both, rng, dropout, mutable=["intermediates"])
    last = cat("last")
    r = jnp.take_along_axis(logits[..., 0], last[:, None], axis=1)[:, 0]
    b = batch["chosen_inputs"].shape[0]
    return {"chosen": r[:b], "rejected": r[b:], "router": moe.collect_stats(state.get("intermediates", {}))}


def objective(apply_fn: Callable, dropout: bool = False) -> Objective:
    """Bradley-Terry as an objective: sums over the batch's pairs (`jaxlm.training.objectives`)."""

    def loss(params, batch, rng):
        r = scores(apply_fn, params, batch, rng, dropout)
        margin = r["chosen"] - r["rejected"]
        total = jnp.sum(jax.nn.softplus(-margin))  # softplus(-x) = -log sigmoid(x)
        metrics = {
            "loss": total, "accuracy": (margin > 0).astype(jnp.float32).sum(), "margin": margin.sum(),
            "reward_chosen": r["chosen"].sum(), "reward_rejected": r["rejected"].sum(),
            "tokens": sum(jnp.sum(batch[f"{s}_segment_ids"] > 0) for s in SIDES).astype(jnp.float32),
            "weight": jnp.asarray(margin.shape[0], jnp.float32),  # the sums are over pairs
        }
        penalty, router_metrics = router_terms(r["router"], metrics["weight"])
        return total + penalty, {**metrics, **router_metrics}

    return Objective("bradley_terry", loss, per_token=False)
