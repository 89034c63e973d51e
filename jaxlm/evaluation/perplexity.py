"""Perplexity and bits-per-byte on held-out text.

Bits-per-byte divides the total negative log-likelihood by the UTF-8 size of the text, so models with
different tokenizers can be compared on the same text; perplexity is per token of this model's tokenizer.
"""

from __future__ import annotations

import math

from tqdm import tqdm

from jaxlm.data.tokenizer import Tokenizer
from jaxlm.inference.scoring import Scorer


def perplexity(scorer: Scorer, tokenizer: Tokenizer, texts: list[str], progress: bool = True) -> dict[str, float]:
    nll, tokens, nbytes = 0.0, 0, 0
    for text in tqdm(texts, desc="perplexity", unit="doc", disable=not progress):
        ids = tokenizer.encode(text)
        if not ids:
            continue
        score = scorer.rolling([tokenizer.bos_id(), *ids])
        nll -= score.logprob
        tokens += score.num_tokens
        nbytes += len(text.encode("utf-8"))
    if not tokens:
        return {"documents": 0, "tokens": 0, "bytes": 0}
    return {
        "documents": len(texts),
        "tokens": tokens,
        "bytes": nbytes,
        "nll_per_token": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / math.log(2) / nbytes,
    }
