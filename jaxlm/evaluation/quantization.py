"""What weight-only quantization costs and saves: memory, logits difference and perplexity change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data.tokenizer import Tokenizer
from jaxlm.evaluation.perplexity import perplexity
from jaxlm.inference.scoring import Scorer, dropless
from jaxlm.model import quantize as quantize_lib


def logits_difference(model, params, quantized, tokens: np.ndarray) -> dict[str, float]:
    model = dropless(model)  # as the scorer and generation run it: no expert capacity to drop tokens at
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    ref = forward(params, tokens)
    out = forward(quantized, tokens)
    diff = jnp.abs(out - ref)
    return {
        "logits_max_abs_diff": float(diff.max()),
        "logits_mean_abs_diff": float(diff.mean()),
        "logits_std": float(ref.std()),  # the scale the differences should be read against
        "top1_agreement": float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1))),
    }


def report(model, params, tokenizer: Tokenizer, texts: list[str], formats=("int8", "int4"), block_size: int = 128,
           batch_size: int = 8, progress: bool = True) -> dict[str, dict]:
    """One row per format (and one for the float params): bytes, perplexity, bits-per-byte and logit error."""
    ids = [tokenizer.bos_id()]
    for text in texts:
        ids += tokenizer.encode(text)
        if len(ids) >= 4 * model.config.max_seq_len:
            break
    length = min(model.config.max_seq_len, len(ids) // 4 or len(ids))
    tokens = np.asarray(ids[:4 * length], np.int32).reshape(-1, length)[:4]
    rows = {"float": {**perplexity(Scorer(model, params, batch_size), tokenizer, texts, progress),
                      "param_bytes": quantize_lib.nbytes(params)}}
    for fmt in formats:
        quantized = quantize_lib.quantize_params(params, fmt, block_size)
        rows[fmt] = {**perplexity(Scorer(model, quantized, batch_size), tokenizer, texts, progress),
                     **logits_difference(model, params, quantized, tokens),
                     "param_bytes": quantize_lib.nbytes(quantized)}
        rows[fmt]["memory_saved"] = 1 - rows[fmt]["param_bytes"] / rows["float"]["param_bytes"]
        rows[fmt]["perplexity_change"] = rows[fmt]["perplexity"] / rows["float"]["perplexity"] - 1
    return rows
