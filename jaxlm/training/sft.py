"""Supervised finetuning data: chats rendered with a template, loss on assistant tokens only, packed.

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

import numpy as np

from jaxlm.core.config import ConfigError
from jaxlm.data import chat, packing

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


def drop_repeats(rows: list[tuple[str, object]], report: Report) -> list[tuple[str, object]]:
    """The rows without exact repeats of an earlier one (counted; `finetune.drop_repeats`). The English
    chatterbot corpus, for one, repeats ten tech-support chats about a hundred times each."""
    seen, out = set(), []
    for where, row in rows:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key in seen:
            report.reject("a repeat of an earlier row", where)
            continue
        seen.add(key)
        out.append((where, row))
    return out


def to_messages(row) -> list[dict]:
    """{"messages": [...]}, {"prompt", "response"} or (seq2seq data) {"input", "target"} as a list of chat
    messages. Raises ValueError if none."""
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row["messages"]
    for prompt, response in (("prompt", "response"), ("input", "target")):
        if isinstance(row, dict) and prompt in row and response in row:
            return [{"role": "user", "content": row[prompt]}, {"role": "assistant", "content": row[response]}]
    raise ValueError("row has neither 'messages' nor 'prompt' and 'response' (nor 'input' and 'target')")


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
    trained only when the example's mask marks it. Rows are the first-fit-decreasing bins of
    `packing.first_fit`, as for pretraining documents, with examples in their given order inside a row;
    padding is segment 0 with no loss. Without packing, each example gets its own row.
    """
    lengths = np.asarray([len(tokens) - 1 for tokens, _ in examples], np.int64)
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"an example of {lengths.max() + 1} tokens does not fit a row of {seq_len}")
    bins = packing.first_fit(lengths, seq_len) if pack_rows else np.arange(len(examples))
    num_rows = int(bins.max()) + 1 if len(bins) else 0
    out = {k: np.zeros((num_rows, seq_len), np.int32) for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    at, seg = np.zeros(num_rows, np.int64), np.zeros(num_rows, np.int64)
    for (tokens, mask), r in zip(examples, bins):
        n, a = len(tokens) - 1, at[r]
        seg[r] += 1
        out["inputs"][r, a:a + n] = tokens[:-1]
        out["targets"][r, a:a + n] = tokens[1:]
        out["positions"][r, a:a + n] = np.arange(n)
        out["segment_ids"][r, a:a + n] = seg[r]
        out["loss_mask"][r, a:a + n] = mask[1:]
        at[r] += n
    return out
