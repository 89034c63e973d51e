"""The model of a config's architecture: the one place that maps `model.architecture` to a Flax module.

Every model takes (tokens, positions, segment_ids) first, so that `init` with a token array alone creates
all of its parameters, and returns float32 logits; an encoder-decoder also takes the decoder's
`decoder_inputs`/`decoder_positions`/`decoder_segment_ids` and returns the decoder's logits, an encoder
takes `token_types`, and a decoder-only model takes `prefix_mask` (prefix-LM attention).
"""

from __future__ import annotations

import flax.linen as nn

from jaxlm.core.config import ModelConfig
from jaxlm.model.pipeline import Pipeline
from jaxlm.model.transformer import Transformer

# Batch keys beside inputs/positions/segment_ids that a model reads when present, passed by name.
MODEL_INPUTS = ("decoder_inputs", "decoder_positions", "decoder_segment_ids", "prefix_mask", "token_types")


def build(c: ModelConfig, impl: str = "xla", pipeline: Pipeline = Pipeline()) -> nn.Module:
    if c.architecture == "t5":
        from jaxlm.model.t5 import EncoderDecoder

        return EncoderDecoder(c, impl)
    if c.architecture == "bert":
        from jaxlm.model.bert import Encoder

        return Encoder(c, impl)
    return Transformer(c, impl, pipeline)
