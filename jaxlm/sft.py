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


def usable(rows, encode_row: Callable, length: Callable, seq_len: int, report: Report):
    """(row, encode_row(row)) for each row that encodes and fits seq_len + 1 tokens; the rest are counted
    in `report` by reason (the template fails, the row is malformed or empty, or it is too long)."""
    for where, row in rows:
        try:
            encoded = encode_row(row)
        except chat.TemplateError as e:
            report.reject(f"chat template cannot render ({e})", where)
            continue
        except (ValueError, TypeError, AttributeError) as e:
            report.reject(str(e) if isinstance(e, ValueError) else "malformed row", where)
            continue
        if length(encoded) > seq_len + 1:
            report.reject(f"longer than train.seq_len={seq_len}", where)
            continue
        report.used += 1
        yield row, encoded


def build_examples(rows, template: chat.Template, encode: Callable, seq_len: int, report: Report):
    """Encodes rows into (tokens, mask) examples of at most seq_len + 1 tokens, counting bad rows."""
    encode_row = lambda row: encode_conversation(to_messages(row), template, encode)
    return [(np.asarray(tokens, np.int32), np.asarray(mask, np.int32))
            for _, (tokens, mask) in usable(rows, encode_row, lambda e: len(e[0]), seq_len, report)]


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


def process_rows(batch_size: int) -> slice:
    """This process's rows of a global batch: `sharding.global_batch` concatenates them in process order."""
    n = batch_size // jax.process_count()
    return slice(jax.process_index() * n, (jax.process_index() + 1) * n)


class RowBatches:
    """Endless batches of in-memory rows. Epoch e visits the rows in a permutation fixed by (seed, e), so the
    batch of any step can be recomputed: the step is the whole data position, and a resumed run reads
    exactly the batches an uninterrupted one would. Each process yields only its own rows."""

    def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int, start: int = 0):
        self.rows, self.batch_size, self.seed, self.step = rows, batch_size, seed, start
        self.n = len(next(iter(rows.values())))
        if self.n < batch_size:
            raise ConfigError(f"the data packs into {self.n} rows, fewer than train.batch_size={batch_size}; "
                              f"lower the batch size")
        self.local = process_rows(batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, k = divmod(self.step, self.n // self.batch_size)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)[k * self.batch_size:(k + 1) * self.batch_size]
        self.step += 1
        return {key: v[order[self.local]] for key, v in self.rows.items()}

    def get_state(self) -> dict:
        return {"step": self.step}


def make_loss(apply_fn: Callable, dropout: bool = False):
    """loss(params, batch, rng) -> (mean loss over assistant tokens, metrics), for make_finetune_step.

    "weight" is the assistant-token count the mean is over; "tokens" counts every non-padding token read."""

    def loss(params, batch, rng):
        rngs = {"dropout": rng} if dropout else None
        kwargs = {"rngs": rngs} if rngs else {}
        logits = apply_fn({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], **kwargs)
        nll, _, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        tokens = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
        return nll / jnp.maximum(count, 1.0), {"tokens": tokens, "weight": count}

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
