"""Supervised finetuning data and loss: chats rendered with a template, loss on assistant tokens only, packed.

A conversation is rendered once per assistant turn (the prefix up to that turn, with the generation
prompt, then the prefix including it), so the assistant's text and the template's end-of-turn marker are
exactly the characters the chat template adds for that turn. Each piece is tokenized on its own and
concatenated, and the loss mask is 1 on the assistant pieces. Rows that cannot be used (the template fails
or is not prefix-stable, the conversation is empty or has no assistant turn, or it is longer than the
sequence) are counted by reason and reported, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import chat
from jaxlm.config import ConfigError
from jaxlm.train_step import cross_entropy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Report:
    """What happened to each input row."""

    used: int = 0
    bad: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, str] = dataclasses.field(default_factory=dict)  # one sample row number per reason

    def reject(self, reason: str, where: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1
        self.examples.setdefault(reason, where)

    def summary(self) -> str:
        parts = [f"{self.used} used"] + [f"{n} skipped: {r} (e.g. {self.examples[r]})" for r, n in self.bad.items()]
        return "; ".join(parts)


def read_jsonl(path: str) -> list[tuple[str, object]]:
    """(where, parsed row) per non-blank line; a line that is not JSON raises ConfigError naming it."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{i} is not valid JSON ({e.msg}); each line must be one JSON object") from None
    except OSError as e:
        raise ConfigError(f"cannot read finetune.data {path}: {e.strerror}") from None
    return rows


def to_messages(row) -> list[dict]:
    """{"messages": [...]} or {"prompt", "response"} as a list of chat messages. Raises ValueError if neither."""
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row["messages"]
    if isinstance(row, dict) and "prompt" in row and "response" in row:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    raise ValueError("row has neither 'messages' nor 'prompt' and 'response'")


def encode_conversation(messages: list[dict], template: chat.Template, encode: Callable[[str], list[int]]):
    """(tokens, loss mask) of one conversation; the mask marks the tokens the assistant turns add.

    Raises chat.TemplateError (the template fails, or a rendering is not a prefix of the next one) or
    ValueError (an empty conversation, or one without an assistant turn)."""
    if not messages or not any(str(m.get("content", "")).strip() for m in messages if isinstance(m, dict)):
        raise ValueError("empty conversation")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ValueError("no assistant turn")
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        full = template.render(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise chat.TemplateError("the chat template does not render each turn as a prefix of the next")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    tokens, mask = list(template.prefix_ids), [0] * len(template.prefix_ids)
    for text, is_assistant in pieces:
        ids = encode(text) if text else []
        tokens += ids
        mask += [int(is_assistant)] * len(ids)
    return tokens, mask


def build_examples(rows, template: chat.Template, encode: Callable, seq_len: int, report: Report):
    """Encodes rows into (tokens, mask) examples of at most seq_len + 1 tokens, counting bad rows."""
    examples = []
    for where, row in rows:
        try:
            tokens, mask = encode_conversation(to_messages(row), template, encode)
        except chat.TemplateError as e:
            report.reject(f"chat template cannot render ({e})", where)
            continue
        except (ValueError, TypeError, AttributeError) as e:
            report.reject(str(e) if isinstance(e, ValueError) else "malformed messages", where)
            continue
        if len(tokens) > seq_len + 1:
            report.reject(f"longer than train.seq_len={seq_len}", where)
            continue
        report.used += 1
        examples.append((np.asarray(tokens, np.int32), np.asarray(mask, np.int32)))
    return examples


def pack(examples, seq_len: int, pack_rows: bool = True) -> dict[str, np.ndarray]:
    """Rows (R, seq_len) of inputs, targets, positions, segment ids and loss masks.

    Each example keeps its own segment id (attention never crosses it) and positions from 0; a target is
    trained only when the example's mask marks it. Packing is first fit in the given order; padding is
    segment 0 with no loss. Without packing, each example gets its own row.
    """
    rows: list[list] = []
    space: list[int] = []
    for tokens, mask in examples:
        n = len(tokens) - 1
        if n > seq_len:
            raise ValueError(f"an example of {n + 1} tokens does not fit a row of {seq_len}")
        slot = next((r for r, free in enumerate(space) if free >= n), None) if pack_rows else None
        if slot is None:
            rows.append([])
            space.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append((tokens, mask))
        space[slot] -= n
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    for r, row in enumerate(rows):
        at = 0
        for seg, (tokens, mask) in enumerate(row, 1):
            n = len(tokens) - 1
            out["inputs"][r, at:at + n] = tokens[:-1]
            out["targets"][r, at:at + n] = tokens[1:]
            out["positions"][r, at:at + n] = np.arange(n)
            out["segment_ids"][r, at:at + n] = seg
            out["loss_mask"][r, at:at + n] = mask[1:]
            at += n
    return out


def batches(rows: dict[str, np.ndarray], batch_size: int, seed: int, start: int = 0):
    """Endless batches; epoch e visits the rows in a permutation fixed by (seed, e), so step s is reproducible."""
    n = len(next(iter(rows.values())))
    if n < batch_size:
        raise ConfigError(f"the data packs into {n} rows, fewer than train.batch_size={batch_size}; lower the batch size")
    per_epoch = n // batch_size
    step = start
    while True:
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)[k * batch_size:(k + 1) * batch_size]
        yield {key: v[order] for key, v in rows.items()}
        step += 1


def make_loss(apply_fn: Callable, dropout: bool = False):
    """loss(params, batch, rng) -> (mean loss over assistant tokens, {"tokens"}), for make_finetune_step."""

    def loss(params, batch, rng):
        rngs = {"dropout": rng} if dropout else None
        kwargs = {"rngs": rngs} if rngs else {}
        logits = apply_fn({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], **kwargs)
        nll, _, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return nll / jnp.maximum(count, 1.0), {"tokens": count}

    return loss


def eval_loss(apply_fn: Callable, params, rows: dict[str, np.ndarray], batch_size: int) -> float:
    """Mean assistant-token loss over whole batches of `rows`."""
    fn = jax.jit(lambda p, b: cross_entropy(apply_fn({"params": p}, b["inputs"], b["positions"], b["segment_ids"]),
                                            b["targets"], b["loss_mask"]))
    nll = count = 0.0
    for i in range(0, len(rows["inputs"]) - batch_size + 1, batch_size):
        n, _, c = fn(params, {k: v[i:i + batch_size] for k, v in rows.items()})
        nll, count = nll + float(n), count + float(c)
    return nll / max(count, 1.0)
