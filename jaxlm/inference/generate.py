"""Autoregressive decoding: a jitted prefill, a jitted one-token step, and a preallocated KV cache.

Prompts of different lengths are left-padded to a common length P. Slot i of the cache holds token i of
the padded row; pad slots are marked invalid and never attended to, and positions (for RoPE) count from
each prompt's first real token. The cache stores KV heads only (GQA), as (L, B, S, K, H).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.core.config import ConfigError, ModelConfig, SamplingConfig
from jaxlm.core.sharding import logical_sharding
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.model.layers import compute_dtype


PROMPT_BUCKET = 32


# The cache's logical axes: batch and KV heads split like the activations they come from; the length
# stays whole on every device, since each step writes one slot of it.
CACHE_AXES = ("layers", "activation_batch", None, "activation_kv_heads", "activation_head_dim")


def init_cache(config: ModelConfig, batch: int, max_len: int, mesh=None, per_layer: bool = False):
    """Zeros (L, B, S, K, H) for keys and values, or with `per_layer` a list of L {"k", "v"} (B, S, K, H) (for
    unrolled layers, see Transformer); with a mesh, born sharded by the logical-axis rules."""
    shape = (batch, max_len, config.num_kv_heads, config.resolved_head_dim)
    axes = CACHE_AXES[1:] if per_layer else CACHE_AXES
    shape = shape if per_layer else (config.num_layers, *shape)
    if mesh is None:
        zeros = lambda: {"k": jnp.zeros(shape, compute_dtype(config)), "v": jnp.zeros(shape, compute_dtype(config))}
    else:
        zeros = _sharded_zeros(shape, compute_dtype(config), logical_sharding(axes, shape, mesh))
    return [zeros() for _ in range(config.num_layers)] if per_layer else zeros()


@functools.lru_cache(maxsize=64)
def _sharded_zeros(shape, dtype, sharding):
    """One compiled program per cache shape: a fresh jit per call would compile again every time (50+ ms)."""
    return jax.jit(lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
                   out_shardings={"k": sharding, "v": sharding})


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) on (B, V) logits; filtered entries become -inf.

    Each setting is one value for all rows or (B,) values, one per row (a serving batch mixes requests);
    top_k 0 and top_p 1 disable their filter."""
    b, v = logits.shape
    per_row = lambda x: jnp.broadcast_to(jnp.asarray(x), (b,))[:, None]
    logits = logits / per_row(temperature)
    if isinstance(top_k, int) and isinstance(top_p, float) and top_k == 0 and top_p >= 1.0:
        return logits  # nothing to filter, known when tracing: skip the sort
    top_k, top_p = per_row(top_k), per_row(top_p)
    sorted_logits = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(sorted_logits, jnp.clip(top_k - 1, 0, v - 1), axis=-1)
    keep = (top_k == 0) | (logits >= kth)
    sorted_logits = jnp.where((top_k == 0) | (jnp.arange(v)[None] < top_k), sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    # (top_p 1 keeps everything outright: rounding can make the mass before the tail reach 1.)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    keep &= (top_p >= 1.0) | (logits >= cutoff)
    return jnp.where(keep, logits, -jnp.inf)


def penalize(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """Divides positive and multiplies negative logits of already-seen tokens by `penalty`."""
    if penalty == 1.0:
        return logits
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def _logp(logits_bv: jax.Array, token_b: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits_bv.astype(jnp.float32)), token_b[:, None], axis=1)[:, 0]


def choose(logits: jax.Array, rng: jax.Array, s: SamplingConfig) -> jax.Array:
    if s.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, s.temperature, s.top_k, s.top_p)).astype(jnp.int32)


class Generator:
    """Compiles prefill and decode once per (batch, prompt length, cache length) and streams tokens."""

    def __init__(self, model, params, sampling: SamplingConfig, mesh=None):
        """With `mesh` (the one the params are sharded over), the cache is sharded over it too and the
        model's activation constraints apply."""
        if sampling.top_k > model.config.vocab_size:  # lax.top_k cannot pick more entries than there are
            raise ConfigError(f"sampling.top_k={sampling.top_k} is out of range: must be <= the model's "
                              f"vocab_size {model.config.vocab_size}")
        self.model, self.params, self.sampling, self.mesh = model, params, sampling, mesh
        self._prefill = jax.jit(self._prefill_fn)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))

    def _prefill_fn(self, params, tokens, pad, cache, rng):
        b, p = tokens.shape
        slots = jnp.arange(cache["k"].shape[2])
        valid = (slots[None, :] >= pad[:, None]) & (slots[None, :] < p)
        positions = jnp.maximum(jnp.arange(p)[None, :] - pad[:, None], 0)
        logits, cache = self.model.apply(
            {"params": params}, tokens, positions, jnp.ones_like(tokens), cache,
            {"slot": jnp.int32(0), "valid": valid},
        )
        seen = jnp.zeros((b, logits.shape[-1]), bool).at[jnp.arange(b)[:, None], tokens].max(valid[:, :p])
        last = penalize(logits[:, -1], seen, self.sampling.repetition_penalty)
        token = choose(last, rng, self.sampling)
        return token, _logp(logits[:, -1], token), cache, valid, seen.at[jnp.arange(b), token].set(True)

    def _step_fn(self, params, cache, token, slot, pad, valid, seen, rng):
        b = token.shape[0]
        valid = valid.at[:, slot].set(True)
        positions = (slot - pad)[:, None]
        logits, cache = self.model.apply(
            {"params": params}, token[:, None], positions, jnp.ones((b, 1), jnp.int32), cache,
            {"slot": slot, "valid": valid},
        )
        last = penalize(logits[:, 0], seen, self.sampling.repetition_penalty)
        token = choose(last, rng, self.sampling)
        return token, _logp(logits[:, 0], token), cache, valid, seen.at[jnp.arange(b), token].set(True)

    def stream(self, prompts: list[list[int]], logprobs: bool = False) -> Iterator:
        """Yields the next token of every prompt, (B,), up to `max_new_tokens` times; with `logprobs`,
        (token, its float32 log-probability under the model's own distribution, before any temperature,
        top-k/top-p or repetition penalty: the log-prob a trainer recomputes for it)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token")
        c, s = self.model.config, self.sampling
        p = max(len(x) for x in prompts)
        total = p + s.max_new_tokens
        if total > c.max_seq_len:
            raise ConfigError(
                f"prompt of {p} tokens + max_new_tokens={s.max_new_tokens} exceeds the model's context of "
                f"{c.max_seq_len}; shorten the prompt or lower max_new_tokens"
            )
        # Rounding the padded length up to a bucket lets prompts of nearby lengths share one compiled program.
        p = max(p, min(-(-p // PROMPT_BUCKET) * PROMPT_BUCKET, c.max_seq_len - s.max_new_tokens))
        total = p + s.max_new_tokens
        pad = np.array([p - len(x) for x in prompts], np.int32)
        tokens = np.zeros((len(prompts), p), np.int32)
        for i, x in enumerate(prompts):
            tokens[i, pad[i]:] = x
        rng = jax.random.key(s.seed)
        cache = init_cache(c, len(prompts), total, self.mesh)
        rng, sub = jax.random.split(rng)
        with self._on_mesh():
            token, logp, cache, valid, seen = self._prefill(self.params, jnp.asarray(tokens), jnp.asarray(pad), cache, sub)
        yield (_fetch(token), _fetch(logp)) if logprobs else _fetch(token)
        for i in range(1, s.max_new_tokens):
            rng, sub = jax.random.split(rng)
            with self._on_mesh():
                token, logp, cache, valid, seen = self._step(
                    self.params, cache, token, jnp.int32(p + i - 1), jnp.asarray(pad), valid, seen, sub)
            yield (_fetch(token), _fetch(logp)) if logprobs else _fetch(token)

    def _on_mesh(self):
        # Entered around each call rather than across the yields, so the caller's code never runs under it.
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()


def _fetch(x: jax.Array) -> np.ndarray:
    """The whole of `x` on this host. On a mesh spanning several processes the rows are split over hosts: every
    process takes part in gathering them (each host's caller gets every row, as with one process)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def complete(generator: Generator, tokenizer: Tokenizer, texts: list[str], stops: tuple[str, ...] = (),
             batch_size: int = 8, truncate: bool = False) -> list[str]:
    """Completions of `texts` (each encoded after BOS), cut at EOS or at the first stop string.

    With `truncate`, a prompt too long for the context keeps only its last tokens (evaluation harnesses
    do the same); without it, such a prompt is an error."""
    keep = generator.model.config.max_seq_len - generator.sampling.max_new_tokens - 1
    if truncate and keep < 1:
        raise ConfigError(f"max_new_tokens={generator.sampling.max_new_tokens} leaves no room for a prompt in the "
                          f"context of {generator.model.config.max_seq_len}")
    encoded = [tokenizer.encode(t) for t in texts]
    prompts = [[tokenizer.bos_id(), *(ids[-keep:] if truncate else ids)] for ids in encoded]
    return complete_tokens(generator, tokenizer, prompts, stops, batch_size)


def complete_tokens(generator: Generator, tokenizer: Tokenizer, prompts: list[list[int]], stops: tuple[str, ...] = (),
                    batch_size: int = 8) -> list[str]:
    """Completions of already-encoded prompts, cut at EOS or at the first stop string."""
    completions = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        outputs, done = [[] for _ in batch], [False] * len(batch)
        for tokens in generator.stream(batch):
            for i, token in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                if token == tokenizer.eos_id():
                    done[i] = True
                    continue
                outputs[i].append(token)
                # Decoding the tail is enough to see a stop string end; decoding everything would be quadratic.
                if stops and any(stop in tokenizer.decode(outputs[i][-16:]) for stop in stops):
                    done[i] = True
            if all(done):
                break
        completions += [cut_at_stop(tokenizer.decode(out), stops) for out in outputs]
    return completions


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt's tokens, after BOS (unless the text, a rendered chat template say, brought its own)."""
    ids = tokenizer.encode(text)
    return ids if ids[:1] == [tokenizer.bos_id()] else [tokenizer.bos_id(), *ids]


def check_stops(tokenizer: Tokenizer, stops) -> None:
    """A stop string the tokenizer cannot produce would never end generation: say so instead."""
    for stop in stops:
        back = tokenizer.decode(tokenizer.encode(stop)) if stop else ""
        if not stop or (stop.strip() or stop) not in back:
            raise ConfigError(f"stop string {stop!r} can never appear in this model's output (its tokenizer turns it "
                              f"into {back!r}); use a string the tokenizer can produce")


def cut_at_stop(text: str, stops) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]
