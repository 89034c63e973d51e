"""The device side of serving: a fixed number of decode slots over one preallocated KV cache (a list of
per-layer caches that the unrolled layers update in place), a jitted prefill of one prompt chunk into one
slot, and a jitted decode step over the slots.

Slot b is row b of the cache; a request's tokens sit at cache positions 0, 1, ... of its row, so its
positions (RoPE) are its cache slots and rows at different lengths decode together. The decode step runs the
first 1, 2, 4, ... rows (enough to cover the busy slots, which the scheduler keeps low), so a lone request does
not pay for 32 rows; a prompt chunk is padded to a power-of-two bucket. The set of programs is known, and
compiled, at start. Rows never mix: a request's tokens do not depend on what the other rows hold (the shape
of the step it runs in can change XLA's kernel, and so float rounding, but in tests never a token). Each
row's sampling settings are arguments of the step: greedy and sampled requests mix without a recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.core.config import ConfigError
from jaxlm.inference.generate import filter_logits, init_cache
from jaxlm.model.transformer import unstack_layers

TOP_LOGPROBS = 20  # alternatives reported per token at most (the OpenAI API's own limit)
SMALLEST_BUCKET = 16


@dataclasses.dataclass
class Sampling:
    """One request's sampling settings, as the step takes them. Temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0  # with the choice index and the token's index, the sample's random key


@dataclasses.dataclass
class Sampled:
    """What one step gives for each row: the token, its log-probability and the most likely alternatives,
    from the model's distribution before temperature and filtering."""

    token: np.ndarray  # (B,) int32
    logprob: np.ndarray  # (B,) float32
    top_ids: np.ndarray  # (B, TOP_LOGPROBS) int32
    top_logprobs: np.ndarray  # (B, TOP_LOGPROBS) float32


def prefill_buckets(chunk: int, max_len: int) -> tuple[int, ...]:
    """Padded chunk lengths: powers of two from SMALLEST_BUCKET, then the chunk size itself."""
    return powers_of_two(SMALLEST_BUCKET, min(chunk, max_len))


def powers_of_two(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 2 x smallest, ... below `largest`, then `largest` itself."""
    return (*(smallest << i for i in range(32) if smallest << i < largest), largest)


def sample(logits, temperature, top_k, top_p, seed, counter) -> dict[str, jax.Array]:
    """Picks each row's token from its (B, V) logits with its own settings; a row's random key comes from its
    seed and its token index, so the draw never depends on other rows."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        filtered = filter_logits(logits, jnp.where(temperature > 0, temperature, 1.0), top_k, top_p)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed, counter)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)  # an all-greedy batch skips the sort
    token = jnp.where(temperature > 0, drawn, greedy)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1]))
    return {"token": token, "logprob": jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0],
            "top_ids": top_ids.astype(jnp.int32), "top_logprobs": top_logprobs}


class SlotEngine:
    """Owns the cache and the compiled programs; called from one thread (the scheduler's)."""

    def __init__(self, model, params, slots: int, prefill_chunk: int, mesh=None):
        c = model.config
        if c.scan_layers:  # unrolled layers update a list of per-layer caches in place (see Transformer)
            model, params = model.clone(config=dataclasses.replace(c, scan_layers=False)), unstack_layers(params, c.num_layers)
        self.model, self.params, self.mesh, self.slots = model, params, mesh, slots
        self.max_len = c.max_seq_len
        self.buckets = prefill_buckets(prefill_chunk, c.max_seq_len)
        self.decode_widths = powers_of_two(1, slots)  # rows the decode step runs, from the first
        # Prompts are cut at multiples of the largest bucket (the scheduler does), so a padded last chunk ends
        # by the next multiple past the context; the slot after that is where idle rows write.
        self.cache_len = -(-c.max_seq_len // self.buckets[-1]) * self.buckets[-1] + 1
        self.reset()
        # The cache keeps the layout it was born with: left to XLA, a step's output could come back with another
        # sharding than the one the next program was compiled for, and compile again mid-request.
        keep = (jax.tree.map(lambda a: a.sharding, self.cache), None)
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,), out_shardings=keep)
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,), out_shardings=keep)

    def reset(self) -> None:
        """A fresh cache: at start, and after a failed step (which may have consumed the old one)."""
        cache = init_cache(self.model.config, self.slots, self.cache_len, self.mesh, per_layer=True)
        # Committed to its devices, like every later step's output: jit compiles apart for uncommitted arrays.
        self.cache = jax.device_put(cache, jax.tree.map(lambda a: a.sharding, cache))

    def _apply(self, params, tokens, positions, cache, slot, valid):
        positions = jnp.minimum(positions, self.max_len - 1)  # padding past the context (learned positions)
        return self.model.apply({"params": params}, tokens, positions, jnp.ones_like(tokens), cache,
                                {"slot": slot, "valid": valid})

    def _prefill_fn(self, params, cache, tokens, slot, start, count, sampling):
        """Writes a (1, C) chunk at positions start.. of row `slot` and samples after its `count`-th token."""
        width = tokens.shape[1]
        row = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0), cache)
        valid = (jnp.arange(self.cache_len) < start + width)[None]  # the chunk's padding is after its tokens
        logits, row = self._apply(params, tokens, (start + jnp.arange(width))[None], row, start, valid)
        cache = jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, axis=0), cache, row)
        last = jax.lax.dynamic_index_in_dim(logits[0], count - 1, axis=0)
        return cache, sample(last, *sampling)

    def _decode_fn(self, params, cache, tokens, lengths, sampling):
        """Writes each of the first W rows' last token at its length and samples the next one (W = the
        tokens' length; the other rows are left as they are)."""
        width = tokens.shape[0]
        rows = jax.tree.map(lambda a: a[:width], cache)
        valid = jnp.arange(self.cache_len)[None] <= lengths[:, None]
        logits, rows = self._apply(params, tokens[:, None], lengths[:, None], rows, lengths, valid)
        cache = jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, 0, axis=0), cache, rows)
        return cache, sample(logits[:, 0], *sampling)

    def prefill(self, slot: int, start: int, chunk: list[int], sampling: Sampling) -> Sampled:
        """Prefills `chunk` at positions start.. of row `slot`; `start` must be a multiple of the largest bucket
        (a padded chunk then fits the cache). Returns the token sampled after the chunk."""
        if start % self.buckets[-1]:
            raise ValueError(f"a prefill chunk must start at a multiple of {self.buckets[-1]}, not {start}")
        width = next((b for b in self.buckets if b >= len(chunk)), None)
        if width is None:
            raise ConfigError(f"a prefill chunk of {len(chunk)} tokens is longer than the largest bucket "
                              f"{self.buckets[-1]}")
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(chunk)] = chunk
        with self._on_mesh():
            self.cache, out = self._prefill(self.params, self.cache, tokens, np.int32(slot), np.int32(start),
                                            np.int32(len(chunk)), _rows([sampling], [0]))  # a first token: index 0
        return _host(out)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, sampling: list[Sampling], counters) -> Sampled:
        """One token for every slot (arrays of `slots` rows); an idle slot passes length -1. Only the first
        rows up to the last busy one (rounded up to a decode width) are computed; the rest come back as 0."""
        busy = np.flatnonzero(lengths >= 0)
        width = next(w for w in self.decode_widths if w > (busy[-1] if len(busy) else 0))
        lengths = np.where(lengths < 0, self.cache_len - 1, lengths).astype(np.int32)  # idle rows write past the context
        with self._on_mesh():
            self.cache, out = self._decode(self.params, self.cache, tokens[:width].astype(np.int32), lengths[:width],
                                           _rows(sampling[:width], np.asarray(counters)[:width]))
        out = _host(out)
        pad = lambda a: np.concatenate([a, np.zeros((self.slots - width, *a.shape[1:]), a.dtype)])
        return Sampled(*(pad(a) for a in (out.token, out.logprob, out.top_ids, out.top_logprobs)))

    def compile(self) -> int:
        """Runs every program once on idle slots, so no request waits for a compile; returns how many."""
        for width in self.decode_widths:
            lengths = np.full(self.slots, -1)
            lengths[width - 1] = 0  # the last of `width` rows busy: the step runs `width` rows
            self.decode(np.zeros(self.slots, np.int32), lengths, [Sampling()] * self.slots, np.zeros(self.slots))
        for width in self.buckets:  # row 0 holds no request yet
            self.prefill(0, 0, [0] * width, Sampling())
        # Sampled rows take the other branch of `sample`: the same programs, traced once above.
        return len(self.decode_widths) + len(self.buckets)

    def compiled_programs(self) -> int:
        """Programs compiled so far (for the check that requests never add one)."""
        return self._prefill._cache_size() + self._decode._cache_size()

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()


def _rows(sampling: list[Sampling], counters) -> tuple[np.ndarray, ...]:
    return (np.array([s.temperature for s in sampling], np.float32), np.array([s.top_k for s in sampling], np.int32),
            np.array([s.top_p for s in sampling], np.float32),
            np.array([s.seed for s in sampling], np.uint32), np.asarray(counters, np.int32))


def _host(out: dict) -> Sampled:
    return Sampled(**{k: np.asarray(v) for k, v in jax.device_get(out).items()})
