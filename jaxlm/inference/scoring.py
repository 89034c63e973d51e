"""Log-likelihood scoring of token sequences: the one primitive behind perplexity, bits-per-byte,
multiple-choice evaluation and the lm-evaluation-harness adapter.

Requests are packed into fixed (batch, length) buckets so that a whole evaluation compiles a handful of
programs, not one per request.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.core.config import ConfigError
from jaxlm.data.tokenizer import Tokenizer

LENGTH_BUCKET = 64  # sequence lengths round up to a multiple of this


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(continuation token | everything before it), natural log
    is_greedy: bool  # every continuation token was the argmax
    num_tokens: int


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + context tokens, continuation tokens), split so that the continuation is tokenized as it would
    be after this context: the pair is encoded whole and cut where it stops agreeing with the context alone.
    Trailing spaces of the context move to the continuation (words start with their space)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped) if stripped else []
    whole = tokenizer.encode(stripped + continuation)
    n = 0
    while n < min(len(whole), len(context_ids)) and whole[n] == context_ids[n]:
        n += 1
    cont = whole[n:] or tokenizer.encode(continuation)
    return [tokenizer.bos_id(), *whole[:n]], cont


def dropless(model):
    """`model` as inference runs it: a mixture-of-experts model without expert capacity (dropless), as cached
    decoding always is. With a capacity, the rows of a batch compete for the experts' places, so a request's
    score would depend on the requests batched with it, and differ from the model `generate` samples from."""
    if not getattr(model.config, "capacity_factor", 0.0):
        return model
    return model.clone(config=dataclasses.replace(model.config, capacity_factor=0.0))


class Scorer:
    def __init__(self, model, params, batch_size: int = 8, max_len: int | None = None):
        self.model, self.params, self.batch_size = dropless(model), params, batch_size
        self.max_len = max_len or model.config.max_seq_len
        self._forward = jax.jit(self._forward_fn)

    def _forward_fn(self, params, tokens, segments, targets):
        """Per-position log p(target) and whether the target was the argmax, both (B, T)."""
        logits = self.model.apply({"params": params}, tokens, None, segments)
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return target_logp, jnp.argmax(logits, axis=-1) == targets

    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        """Scores each continuation given its context. Context + continuation longer than `max_len` + 1 keeps
        its last tokens (the continuation always stays whole)."""
        rows = []
        for context, continuation in requests:
            if not continuation:
                raise ConfigError("a scoring request has an empty continuation")
            if not context:
                raise ConfigError("a scoring request has an empty context; start it with the BOS token")
            if len(continuation) > self.max_len:
                raise ConfigError(f"a continuation of {len(continuation)} tokens exceeds the context of {self.max_len}")
            whole = (list(context) + list(continuation))[-(self.max_len + 1):]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        return self._score_rows(rows)

    def rolling(self, tokens: list[int]) -> Score:
        """Log-likelihood of tokens[1:] given tokens[0] (usually BOS), in disjoint windows of `max_len`
        predictions; each window sees only its own tokens as context."""
        if len(tokens) < 2:
            raise ConfigError("rolling scoring needs at least two tokens (BOS and one more)")
        rows = []
        for start in range(0, len(tokens) - 1, self.max_len):
            window = tokens[start:start + self.max_len + 1]
            rows.append((window[:-1], window[1:], len(window) - 1))
        scores = self._score_rows(rows)
        return Score(sum(s.logprob for s in scores), all(s.is_greedy for s in scores), len(tokens) - 1)

    def _score_rows(self, rows: list[tuple[list[int], list[int], int]]) -> list[Score]:
        # Longest first, so that each batch's rows have similar lengths and few buckets compile.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[Score | None] = [None] * len(rows)
        for b in range(0, len(order), self.batch_size):
            chunk = order[b:b + self.batch_size]
            length = min(-(-len(rows[chunk[0]][0]) // LENGTH_BUCKET) * LENGTH_BUCKET, self.max_len)
            tokens = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros_like(tokens)
            segments = np.zeros_like(tokens)  # 0 marks padding, which no real token attends to
            for r, i in enumerate(chunk):
                inputs, outs, _ = rows[i]
                tokens[r, :len(inputs)], targets[r, :len(outs)], segments[r, :len(inputs)] = inputs, outs, 1
            logp, greedy = jax.device_get(self._forward(self.params, tokens, segments, targets))
            for r, i in enumerate(chunk):
                n_in, n = len(rows[i][0]), rows[i][2]
                span = slice(n_in - n, n_in)
                results[i] = Score(float(np.sum(logp[r, span], dtype=np.float64)), bool(greedy[r, span].all()), n)
        return results
