"""Encoder-decoder (T5) decoding: the encoder runs once per batch, then a jitted one-token decoder step.

The encoder inputs are right-padded to a bucket (segment id 0 on padding, which cross-attention masks). The
encoding call also projects every decoder layer's cross-attention keys and values of the encoder output
(`EncoderDecoder.cross_kv`), which never change while decoding, and allocates the decoder's self-attention
cache; each step then writes one key and value per layer at its slot. Every decoder row starts at slot 0
with `config.decoder_start_id`, so slot i holds decoder position i. Cache layout (`EncoderDecoder.decode`):

    {"self": {"k", "v"} (L, B, max_new_tokens, N, H), "cross": {"k", "v"} (L, B, Se, N, H)}

Sampling (temperature, top-k/top-p, repetition penalty, log-probs) is `jaxlm.inference.generate`'s, so that
`Seq2SeqGenerator` streams like its `Generator` and `generate.complete_tokens` works with either.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.core.config import ConfigError, SamplingConfig
from jaxlm.core.sharding import constrain
from jaxlm.inference.generate import CACHE_AXES, PROMPT_BUCKET, Generator, _fetch, _logp, choose, penalize
from jaxlm.model.layers import compute_dtype


class Seq2SeqGenerator(Generator):
    """Compiles the encoding and the decoder step once per (batch, input bucket, max_new_tokens) and streams
    tokens. Shares `Generator`'s checks, mesh handling and sampling; prompts are encoder inputs."""

    def __init__(self, model, params, sampling: SamplingConfig, mesh=None):
        if not model.config.encoder_decoder:
            raise ConfigError(f"Seq2SeqGenerator decodes an encoder-decoder (model.architecture=t5), not "
                              f"model.architecture={model.config.architecture}; use jaxlm.inference.generate.Generator")
        super().__init__(model, params, sampling, mesh)
        self._encode = jax.jit(self._encode_fn)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))  # the cache is updated in place

    def _encode_fn(self, params, tokens_bs, segment_ids_bs):
        """The decoding cache of a batch of encoder inputs (module docstring), and the repetition penalty's
        `seen` tokens: the start token, as in transformers, whose penalty reads the decoder's tokens only."""
        c, s = self.model.config, self.sampling
        b = tokens_bs.shape[0]
        variables = {"params": params}
        encoded = self.model.apply(variables, tokens_bs, None, segment_ids_bs, method="encode")
        cross = self.model.apply(variables, encoded, method="cross_kv")
        shape = (c.resolved_decoder_layers, b, s.max_new_tokens, c.num_heads, c.resolved_head_dim)
        zeros = lambda: constrain(jnp.zeros(shape, compute_dtype(c)), CACHE_AXES)
        cache = {"self": {"k": zeros(), "v": zeros()},
                 "cross": {k: constrain(v, CACHE_AXES) for k, v in cross.items()}}
        seen = jnp.zeros((b, c.vocab_size), bool).at[:, c.decoder_start_id].set(True)
        return cache, seen

    def _step_fn(self, params, cache, token, slot, segment_ids_bs, seen, rng):
        """Feeds `token` (B,) at decoder slot `slot` and picks the next one."""
        b = token.shape[0]
        logits, cache = self.model.apply(
            {"params": params}, None, segment_ids_bs, token[:, None], None, jnp.ones((b, 1), jnp.int32), cache,
            {"slot": slot}, method="decode")
        last = penalize(logits[:, 0], seen, self.sampling.repetition_penalty)
        token = choose(last, rng, self.sampling)
        return token, _logp(logits[:, 0], token), cache, seen.at[jnp.arange(b), token].set(True)

    def stream(self, prompts: list[list[int]], logprobs: bool = False) -> Iterator:
        """Yields the next decoder token of every encoder input, (B,), `max_new_tokens` times; with
        `logprobs`, (token, its float32 log-probability before any sampling filter), as `Generator.stream`."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token")
        c, s = self.model.config, self.sampling
        # Rounding the input length up to a bucket lets inputs of nearby lengths share one compiled program.
        width = -(-max(len(x) for x in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens = np.zeros((len(prompts), width), np.int32)
        segment_ids = np.zeros((len(prompts), width), np.int32)
        for i, x in enumerate(prompts):
            tokens[i, :len(x)], segment_ids[i, :len(x)] = x, 1
        segment_ids = jnp.asarray(segment_ids)
        token = jnp.full((len(prompts),), c.decoder_start_id, jnp.int32)
        rng = jax.random.key(s.seed)
        with self._on_mesh():
            cache, seen = self._encode(self.params, jnp.asarray(tokens), segment_ids)
        for i in range(s.max_new_tokens):
            rng, sub = jax.random.split(rng)
            with self._on_mesh():
                token, logp, cache, seen = self._step(self.params, cache, token, jnp.int32(i), segment_ids, seen, sub)
            yield (_fetch(token), _fetch(logp)) if logprobs else _fetch(token)
