"""Context-parallel (ring) attention: the sequence is split over the `sequence` mesh axis.

Each of the n devices on the axis holds T/n tokens of every row. Its queries stay put while the key/value
blocks travel round the ring (device i sends to i+1), so after n steps every query has seen every key; the
partial results are merged with an online softmax (running max, denominator and numerator in float32),
which gives the same result as one softmax over the whole row.

Tokens are laid out in zigzag order: the row is cut into 2n chunks and device r holds chunks r and
2n-1-r. Under a causal mask an early chunk sees few keys and a late chunk many, so pairing them gives
every device the same amount of work. The caller permutes the token order once for the whole model
(`zigzag_order`); the attention here works on indices in that layout and never permutes.

Memory: a device keeps only its T/n queries, and the (T/n x T/n) scores of one step at a time. Each ring
step is rematerialised in the backward pass, so the per-step scores are never stored, but the backward
pass still keeps every step's incoming k/v block (plus each step's running max, one float per query and
head), i.e. O(T) keys and values per device, as much as an all-gather of k/v would. What it saves is the
T x T/n score matrix. Sending the next k/v block does not depend on the current step's attention, so
the transfer can overlap the compute, in principle (whether it does is up to the compiler's scheduling).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlm.core.config import ConfigError
from jaxlm.core.sharding import BATCH_AXES
from jaxlm.model import attention


def check_length(seq_len: int, shards: int) -> None:
    if seq_len % (2 * shards):
        raise ConfigError(
            f"train.seq_len={seq_len} must be divisible by 2*mesh.sequence={2 * shards} (context "
            f"parallelism splits each row into 2 chunks per sequence shard); change one of them"
        )


def zigzag_order(length: int, shards: int) -> np.ndarray:
    """`perm` such that x[:, perm], cut into `shards` pieces, gives shard r the chunks r and 2*shards-1-r."""
    if length % (2 * shards):
        raise ValueError(f"length {length} is not divisible by 2*shards={2 * shards}")
    chunks = np.arange(length).reshape(2 * shards, length // (2 * shards))
    order = [c for r in range(shards) for c in (r, 2 * shards - 1 - r)]
    return chunks[order].reshape(-1)


def inverse_order(perm: np.ndarray) -> np.ndarray:
    return np.argsort(perm)


def shard_indices(local_len: int, shards: int, axis_index) -> jax.Array:
    """Original token positions of the `local_len` tokens shard `axis_index` holds in zigzag layout."""
    chunk = local_len // 2
    offsets = jnp.arange(chunk, dtype=jnp.int32)
    first = axis_index * chunk + offsets
    second = (2 * shards - 1 - axis_index) * chunk + offsets
    return jnp.concatenate([first, second]).astype(jnp.int32)


def _may_see(q_idx, k_idx, sliding_window: int):
    """Whether any query of a contiguous chunk sees any key of another: skip the block if not."""
    q_lo, q_hi, k_lo, k_hi = q_idx[0], q_idx[-1], k_idx[0], k_idx[-1]
    visible = k_lo <= q_hi  # else every key comes after every query
    if sliding_window:
        visible &= q_lo - k_hi < sliding_window  # else every key is out of every query's window
    return visible


def _online_update(acc, q, k, v, seg_q, seg_k, q_idx, k_idx, sliding_window: int):
    """Folds one key block into the running (max, denominator, numerator) of one query chunk.

    q (B, Tq, K, G, H); k, v (B, S, K, H). The accumulators are (B, Tq, K, G) and (B, Tq, K, G, H).
    """
    m, l, o = acc
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqkgh,bskh->bqkgs", q, k, preferred_element_type=jnp.float32) * scale
    allowed = k_idx[None, :] <= q_idx[:, None]
    if sliding_window:
        allowed &= q_idx[:, None] - k_idx[None, :] < sliding_window
    mask = allowed[None] & (seg_q[:, :, None] == seg_k[:, None, :])  # (B, Tq, S)
    # -inf (not a large finite value) so masked scores give exactly exp(-inf) = 0 with a zero gradient.
    scores = jnp.where(mask[:, :, None, None, :], scores, -jnp.inf)
    # The result does not depend on which max is subtracted, so no gradient needs to flow through it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, scores.max(axis=-1)))
    # A row with no visible key so far keeps m = -inf; subtracting 0 instead avoids (-inf) - (-inf).
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    probs = jnp.exp(scores - m_safe[..., None])
    correction = jnp.exp(m - m_safe)
    l_new = l * correction + probs.sum(axis=-1)
    pv = jnp.einsum("bqkgs,bskh->bqkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l_new, o * correction[..., None] + pv


def _attend_block(accs, queries, block, sliding_window: int):
    """One ring step: both local query chunks against both chunks of the key block held now."""
    q, seg_q, q_idx = queries
    k, v, seg_k, k_idx = block
    half_q, half_k = q.shape[1] // 2, k.shape[1] // 2
    update = functools.partial(_online_update, sliding_window=sliding_window)
    new_accs = []
    for i, acc in enumerate(accs):
        qs = slice(i * half_q, (i + 1) * half_q)
        for j in range(2):
            ks = slice(j * half_k, (j + 1) * half_k)
            args = (q[:, qs], k[:, ks], v[:, ks], seg_q[:, qs], seg_k[:, ks], q_idx[qs], k_idx[ks])
            acc = jax.lax.cond(
                _may_see(q_idx[qs], k_idx[ks], sliding_window), update, lambda acc, *_: acc, acc, *args
            )
        new_accs.append(acc)
    return tuple(new_accs)


def ring_attention(q, k, v, segment_ids, *, sliding_window: int = 0, axis_name: str = "sequence"):
    """Per-device body under `jax.shard_map` over `axis_name`: this shard's zigzag-ordered tokens.

    q (B, T/n, N, H), k and v (B, T/n, K, H), segment_ids (B, T/n). Returns (B, T/n, N, H) in q.dtype.
    """
    b, t, n_heads, h = q.shape
    kv_heads = k.shape[2]
    shards = jax.lax.axis_size(axis_name)
    idx = shard_indices(t, shards, jax.lax.axis_index(axis_name))
    grouped = q.reshape(b, t, kv_heads, n_heads // kv_heads, h)  # query heads grouped by KV head
    queries = (grouped, segment_ids, idx)
    half = (b, t // 2, kv_heads, n_heads // kv_heads)  # accumulator shape of one query chunk
    zero_acc = (jnp.full(half, -jnp.inf, jnp.float32), jnp.zeros(half, jnp.float32),
                jnp.zeros(half + (h,), jnp.float32))
    accs = (zero_acc, zero_acc)
    # Only the step's inputs are saved for the backward pass; its scores are recomputed there.
    attend = jax.checkpoint(
        functools.partial(_attend_block, sliding_window=sliding_window), prevent_cse=False
    )
    ring = [(i, (i + 1) % shards) for i in range(shards)]

    def step(carry, _):
        accs, block = carry
        # Sending the block does not wait on this step's attention, so the two can overlap.
        incoming = jax.lax.ppermute(block, axis_name, perm=ring)
        return (attend(accs, queries, block), incoming), None

    block = (k, v, segment_ids, idx)
    if shards > 1:
        (accs, block), _ = jax.lax.scan(step, (accs, block), None, length=shards - 1)
    accs = attend(accs, queries, block)
    _, l, o = (jnp.concatenate(parts, axis=1) for parts in zip(*accs))
    # A row that saw no key has l = 0 and o = 0: dividing by 1 gives 0 instead of NaN.
    out = o / jnp.where(l == 0, 1.0, l)[..., None]
    return out.reshape(b, t, n_heads, h).astype(q.dtype)


def sharded_ring_attention(q, k, v, segment_ids, sliding_window: int = 0):
    """Ring attention under the current mesh: batch over the batch axes, length over `sequence`.

    The inputs must already be in zigzag order along T (`zigzag_order`); the output is in that order too.
    Without a mesh, or with one sequence shard (where the zigzag order is the identity), it is plain
    `attention.xla_attention`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    shards = sizes.get("sequence", 1)
    if shards == 1:
        return attention.xla_attention(q, k, v, segment_ids, sliding_window)
    check_length(q.shape[1], shards)
    batch = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1) or None
    tensor = sizes.get("tensor", 1)
    heads = "tensor" if tensor > 1 and k.shape[2] % tensor == 0 else None
    qkv_spec = P(batch, "sequence", heads, None)
    fn = functools.partial(ring_attention, sliding_window=sliding_window, axis_name="sequence")
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, "sequence")), out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, segment_ids)
