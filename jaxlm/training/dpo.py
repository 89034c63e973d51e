"""Direct preference optimisation (Rafailov et al., 2023) on (prompt, chosen, rejected) pairs.

loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with log-probabilities summed over the response tokens. The reference log-probs come from the JSONL
("ref_chosen_logp", "ref_rejected_logp") or are computed once, before training, with the frozen reference
model (the starting model unless `finetune.reference` names another run), so no second model stays in
memory while training.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import chat
from jaxlm.training.objectives import Objective, per_token_losses, router_terms
from jaxlm.training.sft import Report, usable

SIDES = ("chosen", "rejected")


def prompt_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return prompt
    raise ValueError("'prompt' must be a string or a list of messages")


def encode_pair(row: dict, template: chat.Template, encode: Callable[[str], list[int]]):
    """{side: (tokens, response mask)} for one preference row; raises ValueError or chat.TemplateError."""
    if not isinstance(row, dict) or not all(isinstance(row.get(k), (str, list)) for k in ("prompt", *SIDES)):
        raise ValueError("row needs 'prompt', 'chosen' and 'rejected'")
    messages = prompt_messages(row["prompt"])
    if not any(str(m.get("content", "")).strip() for m in messages) or not all(str(row[s]).strip() for s in SIDES):
        raise ValueError("empty conversation")
    prompt = template.render(messages, add_generation_prompt=True)
    prompt_ids = list(template.prefix_ids) + encode(prompt)
    out = {}
    for side in SIDES:
        full = template.render(messages + [{"role": "assistant", "content": row[side]}])
        if not full.startswith(prompt):
            raise chat.TemplateError("the chat template does not render the prompt as a prefix of the answer")
        response = encode(full[len(prompt):])
        out[side] = (np.asarray(prompt_ids + response, np.int32),
                     np.asarray([0] * len(prompt_ids) + [1] * len(response), np.int32))
    return out


def build_rows(rows, template: chat.Template, encode: Callable, seq_len: int, report: Report) -> dict[str, np.ndarray]:
    """Arrays (N, seq_len) per side: {side}_inputs/_targets/_positions/_segment_ids/_mask, and ref_{side} (N,)
    (NaN where the row brings no reference log-prob)."""
    pairs, refs = [], []
    encode_row = lambda row: encode_pair(row, template, encode)
    for row, pair in usable(rows, encode_row, lambda p: max(len(t) for t, _ in p.values()), seq_len, report):
        pairs.append(pair)
        refs.append([float(row.get(f"ref_{s}_logp", np.nan)) for s in SIDES])
    n = len(pairs)
    out = {}
    for i, side in enumerate(SIDES):
        arr = {k: np.zeros((n, seq_len), np.int32) for k in ("inputs", "targets", "positions", "segment_ids", "mask")}
        for r, pair in enumerate(pairs):
            tokens, mask = pair[side]
            m = len(tokens) - 1
            arr["inputs"][r, :m], arr["targets"][r, :m] = tokens[:-1], tokens[1:]
            arr["positions"][r, :m], arr["segment_ids"][r, :m] = np.arange(m), 1
            arr["mask"][r, :m] = mask[1:]
        out.update({f"{side}_{k}": v for k, v in arr.items()})
        out[f"ref_{side}"] = np.asarray([ref[i] for ref in refs], np.float32).reshape(n)
    return out


def sequence_logps(apply_fn: Callable, params, batch: dict, rng=None, dropout: bool = False,
                   loss_chunks: int = 0) -> dict[str, jax.Array]:
    """{side: (B,) summed log-probs of the response tokens}, both sides in one forward pass."""
    cat = lambda key: jnp.concatenate([batch[f"{s}_{key}"] for s in SIDES])
    both = {k: cat(k) for k in ("inputs", "positions", "segment_ids")}
    _, nll, router, _ = per_token_losses(apply_fn, params, both, cat("targets"), rng, dropout, loss_chunks)
    logp = -jnp.sum(nll * cat("mask").astype(jnp.float32), axis=-1)
    b = batch["chosen_inputs"].shape[0]
    return {"chosen": logp[:b], "rejected": logp[b:], "router": router}


def objective(apply_fn: Callable, beta: float, dropout: bool = False, loss_chunks: int = 0) -> Objective:
    """DPO as an objective: sums over the batch's pairs (`jaxlm.training.objectives`)."""

    def loss(params, batch, rng):
        logp = sequence_logps(apply_fn, params, batch, rng, dropout, loss_chunks)
        reward_c = beta * (logp["chosen"] - batch["ref_chosen"])
        reward_r = beta * (logp["rejected"] - batch["ref_rejected"])
        margin = reward_c - reward_r
        total = jnp.sum(jax.nn.softplus(-margin))  # softplus(-x) = -log sigmoid(x)
        metrics = {
            "loss": total, "reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(), "margin": margin.sum(),
            "reward_accuracy": (margin > 0).astype(jnp.float32).sum(),
            "tokens": sum(jnp.sum(batch[f"{s}_segment_ids"] > 0) for s in SIDES).astype(jnp.float32),
            "weight": jnp.asarray(margin.shape[0], jnp.float32),  # the sums are over pairs
        }
        penalty, router_metrics = router_terms(logp["router"], metrics["weight"])
        return total + penalty, {**metrics, **router_metrics}

    return Objective("dpo", loss, per_token=False)


def fill_reference(apply_fn: Callable, params, rows: dict[str, np.ndarray], batch_size: int, progress: bool = True) -> int:
    """Computes the reference log-probs the data does not bring, in place; returns how many pairs it computed."""
    missing = np.flatnonzero(np.isnan(rows["ref_chosen"]) | np.isnan(rows["ref_rejected"]))
    if not len(missing):
        return 0
    from tqdm import tqdm

    # Replicated output under a mesh: every process can read it (on several hosts, a batch-sharded one would not be).
    on_mesh = not jax.sharding.get_abstract_mesh().empty
    fn = jax.jit(lambda p, b: {s: sequence_logps(apply_fn, p, b)[s] for s in SIDES},
                 out_shardings=jax.sharding.PartitionSpec() if on_mesh else None)
    keys = [k for k in rows if not k.startswith("ref_")]
    for i in tqdm(range(0, len(missing), batch_size), desc="reference log-probs", unit="batch", disable=not progress):
        idx = missing[i:i + batch_size]
        pad = np.resize(idx, batch_size)  # a fixed batch shape: one compilation
        out = jax.device_get(fn(params, {k: rows[k][pad] for k in keys}))
        for side in SIDES:
            rows[f"ref_{side}"][idx] = out[side][:len(idx)]
    return len(missing)
