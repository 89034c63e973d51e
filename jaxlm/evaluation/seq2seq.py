"""Perplexity of targets given inputs: `{"input", "target"}` JSONL rows, scored by an encoder-decoder (the
encoder reads the input, the decoder is scored on the target and its EOS) or by a decoder-only model (the
target and EOS as the continuation of BOS + input).

Per-token figures are over target tokens, EOS included, so that an encoder-decoder and a decoder-only model
with the same tokenizer are compared on the same tokens.
"""

from __future__ import annotations

import functools
import math

import jax
from tqdm import tqdm

from jaxlm.core.config import ConfigError
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.inference.scoring import LENGTH_BUCKET, Scorer
from jaxlm.training import objectives, seq2seq, sft


def load_rows(path: str) -> list[tuple[str, str]]:
    """(input, target) of every row; a row without both strings is a one-line error naming it."""
    rows = []
    for where, row in sft.read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("target"), str):
            raise ConfigError(f"{where} has no 'input' and 'target' strings; each row must be {{\"input\": ..., \"target\": ...}}")
        rows.append((row["input"], row["target"]))
    if not rows:
        raise ConfigError(f"{path} has no rows")
    return rows


def _bucket(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


@functools.lru_cache(maxsize=8)
def _summed_nll(model):
    """The jitted (params, batch) -> summed target NLL of the training objective (`objectives.next_token`),
    compiled once per model and row shape, also across the evals of a training run."""
    loss = objectives.next_token(model.apply).loss
    return jax.jit(lambda params, batch: loss(params, batch, None)[1]["loss"])


def _encoder_decoder_nll(model, params, examples, batch_size: int, progress: bool) -> tuple[float, int]:
    """Summed target NLL and target tokens, in batches of one example per row pair, lengths bucketed."""
    nll = _summed_nll(model)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    total, tokens = 0.0, 0
    for b in tqdm(range(0, len(order), batch_size), desc="targets", unit="batch", disable=not progress):
        chunk = [examples[i] for i in order[b:b + batch_size]]
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # a fixed batch: one program per length bucket
        rows = seq2seq.pack(chunk, _bucket(max(len(i) for i, _ in chunk)), _bucket(max(len(t) for _, t in chunk)),
                            pack_rows=False, start=model.config.decoder_start_id)
        real = min(batch_size, len(order) - b)
        rows["loss_mask"][real:] = 0  # the repeated filler rows are not scored
        total += float(nll(params, rows))
        tokens += int(rows["loss_mask"].sum())
    return total, tokens


def target_perplexity(model, params, tokenizer: Tokenizer, rows: list[tuple[str, str]], batch_size: int = 8,
                      progress: bool = True, scorer: Scorer | None = None) -> dict:
    eos = tokenizer.eos_id()
    if model.config.encoder_only:
        raise ConfigError("an encoder (model.architecture=bert) does not generate targets; targets:FILE needs "
                          "an encoder-decoder or a decoder-only model")
    if model.config.encoder_decoder:
        examples = [seq2seq.encode_pair({"input": i, "target": t}, tokenizer.encode, eos) for i, t in rows]
        nll, tokens = _encoder_decoder_nll(model, params, examples, batch_size, progress)
    else:
        scorer = scorer or Scorer(model, params, batch_size)
        requests = [([tokenizer.bos_id(), *tokenizer.encode(i)], [*tokenizer.encode(t), eos]) for i, t in rows]
        scores = scorer.loglikelihood(requests)
        nll, tokens = -sum(s.logprob for s in scores), sum(s.num_tokens for s in scores)
    return {"examples": len(rows), "tokens": tokens, "nll_per_token": nll / tokens,
            "perplexity": math.exp(nll / tokens)}
