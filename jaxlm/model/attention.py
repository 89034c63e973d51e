"""Attention kernels behind one switch: XLA reference, cuDNN flash (GPU) and Pallas splash (TPU).

All take q (B, T, N, H), k and v (B, S, K, H) with K dividing N (GQA/MQA), and per-token segment ids
(B, T) for packed rows: a token attends only to earlier tokens of its own segment, and, with a sliding
window W, only to the W most recent of those (itself included).

Prefix-LM rows (`prefix_mask` (B, T), 1 inside a document's bidirectional prefix) also let a prefix token
attend every prefix token of its segment, later ones included; those prefix pairs ignore the sliding window
(the prefix is one bidirectional context, however long). Only the XLA path implements it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.core.config import ConfigError

IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def resolve(impl: str, platform: str | None = None) -> str:
    """Picks the kernel for `auto` and rejects a kernel the hardware cannot run, with the fix."""
    platform = platform or jax.default_backend()
    if impl == "auto":
        return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
    need = {"cudnn": "gpu", "splash": "tpu"}.get(impl)
    if need and platform != need:
        raise ConfigError(
            f"model.attention={impl} needs a {need.upper()} but the backend is {platform}; "
            f"use model.attention=auto or model.attention=xla"
        )
    return impl


def _causal(q_lo: int, q_hi: int, k_lo: int, k_hi: int, sliding_window: int) -> jax.Array:
    """Boolean (q_hi - q_lo, k_hi - k_lo): key j is not after query i and, with a window, within it."""
    q_idx = jnp.arange(q_lo, q_hi)[:, None]
    k_idx = jnp.arange(k_lo, k_hi)[None, :]
    allowed = k_idx <= q_idx
    if sliding_window:
        allowed &= q_idx - k_idx < sliding_window
    return allowed


def _prefix_pairs(prefix_mask, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> jax.Array:
    """Boolean (B, q_hi - q_lo, k_hi - k_lo): query and key both inside a prefix (segments tested apart)."""
    pm = prefix_mask.astype(bool)
    return pm[:, q_lo:q_hi, None] & pm[:, None, k_lo:k_hi]


def make_mask(segment_ids: jax.Array, sliding_window: int, prefix_mask: jax.Array | None = None) -> jax.Array:
    """Boolean (B, 1, T, T) mask: same segment, and causal within the window (or a prefix pair)."""
    t = segment_ids.shape[1]
    allowed = _causal(0, t, 0, t, sliding_window)[None]
    if prefix_mask is not None:
        allowed = allowed | _prefix_pairs(prefix_mask, 0, t, 0, t)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (allowed & same)[:, None]


def _masked_attention(q, k, v, allowed, seg_q, seg_k):
    """Softmax attention of q (B, T, N, H) over k, v (B, S, K, H); `allowed` is a (T, S) position mask, or
    (B, T, S) when rows sit at different positions."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)  # (B, T, K, G, H): query heads grouped by their KV head
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (h**-0.5)
    allowed = allowed if allowed.ndim == 3 else allowed[None]
    mask = allowed & (seg_q[:, :, None] == seg_k[:, None, :])  # (B, T, S)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def xla_attention(q, k, v, segment_ids, sliding_window: int = 0, max_blocks: int = 8, prefix_mask=None):
    """The reference path, in query blocks: block i only reads the keys it can see (causal, window).

    Skipping the fully masked key blocks roughly halves the work of causal attention; the result is
    the same as one masked softmax over the whole square. With `prefix_mask` (B, T) the rows are
    prefix-LM rows (module docstring; `_prefix_block`).
    """
    t = q.shape[1]
    block = max(64, -(-t // max_blocks))
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        k_start = max(0, start - sliding_window + 1) if sliding_window else 0
        if prefix_mask is not None:
            outs.append(_prefix_block(q, k, v, segment_ids, prefix_mask, start, end, k_start, sliding_window))
            continue
        outs.append(_masked_attention(
            q[:, start:end], k[:, k_start:end], v[:, k_start:end], _causal(start, end, k_start, end, sliding_window),
            segment_ids[:, start:end], segment_ids[:, k_start:end],
        ))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _prefix_block(q, k, v, segment_ids, prefix_mask, start: int, end: int, k_start: int, sliding_window: int):
    """Prefix-LM attention of the query block [start, end).

    A prefix query may see keys outside the causal range [k_start, end) that the blocked loop reads: later
    prefix keys of its segment (and, with a window, earlier ones beyond it). Which blocks need them depends on
    the data, and shapes are static, so each block computes a cheap boolean (no head or feature axis): does
    any same-segment prefix pair fall outside that range? A `lax.cond` then runs the block over all T keys
    only if so, and otherwise over the causal range (with the in-range prefix pairs) at the causal cost. In a
    batch whose prefixes end early, the blocks past them keep the causal saving; a prefix crossing a block
    boundary costs only its own blocks. Both branches give the same softmax where the predicate is false (the
    keys left out are all masked), so the choice never changes the result beyond rounding.
    """
    t = q.shape[1]
    seg_q = segment_ids[:, start:end]

    def over(lo: int, hi: int):  # the block's attention over keys [lo, hi)
        allowed = _causal(start, end, lo, hi, sliding_window)[None] | _prefix_pairs(prefix_mask, start, end, lo, hi)
        return _masked_attention(q[:, start:end], k[:, lo:hi], v[:, lo:hi], allowed, seg_q, segment_ids[:, lo:hi])

    if k_start == 0 and end == t:  # the causal range is already every key
        return over(0, t)
    outside = [(0, k_start)] if k_start else []
    outside += [(end, t)] if end < t else []
    wide_needed = jnp.zeros((), bool)
    for lo, hi in outside:
        same = seg_q[:, :, None] == segment_ids[:, None, lo:hi]
        wide_needed |= jnp.any(_prefix_pairs(prefix_mask, start, end, lo, hi) & same)
    return jax.lax.cond(wide_needed, lambda: over(0, t), lambda: over(k_start, end))


def write_cache(cache_bskh, new_btkh, slot):
    """Writes T new keys or values at cache slots slot..slot+T-1: `slot` is one int for every row, or (B,)
    ints, one per row (a serving batch whose rows are at different lengths)."""
    new_btkh = new_btkh.astype(cache_bskh.dtype)
    if jnp.ndim(slot) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache_bskh, new_btkh, slot, axis=1)
    write_row = lambda cache_skh, new_tkh, at: jax.lax.dynamic_update_slice_in_dim(cache_skh, new_tkh, at, axis=0)
    return jax.vmap(write_row)(cache_bskh, new_btkh, slot)


def cached_attention(q, k_cache, v_cache, slot, valid, sliding_window: int = 0):
    """Queries at cache slots slot..slot+T-1 attend over the whole (B, S, K, H) cache; `slot` as in
    `write_cache`.

    A key is visible if its slot holds a token (`valid`, (B, S)), is not after the query's slot, and (with a
    window) is within the window. Prompts are left-padded (or each row starts at slot 0), so slot distance
    equals position distance.
    """
    t, s = q.shape[1], k_cache.shape[1]
    q_slot = jnp.expand_dims(slot, (-1, -2)) + jnp.arange(t)[:, None]  # (T, 1), or (B, T, 1) per row
    k_slot = jnp.arange(s)[None, :]
    allowed = k_slot <= q_slot
    if sliding_window:
        allowed &= q_slot - k_slot < sliding_window
    ones = jnp.ones(q.shape[:2], jnp.int32)
    return _masked_attention(q, k_cache, v_cache, allowed, ones, valid.astype(jnp.int32))


def cudnn_attention(q, k, v, segment_ids, sliding_window: int = 0):
    # cuDNN skips the masked-out causal blocks; the segment mask is only passed for packed rows.
    window = (sliding_window - 1, 0) if sliding_window else None
    return jax.nn.dot_product_attention(
        q, k, v, mask=make_mask(segment_ids, 0), is_causal=True, local_window_size=window,
        implementation="cudnn",
    )


def splash_attention(q, k, v, segment_ids, sliding_window: int = 0, interpret: bool = False):
    """Pallas splash attention. Runs on TPU; `interpret=True` runs the same kernel on CPU for tests.

    Called per device (inside shard_map or on a single device), with whole sequences on each device.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, n, h = q.shape
    kv = k.shape[2]
    groups = n // kv
    if sliding_window:
        mask = masks.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0)
    else:
        mask = masks.CausalMask((t, t))
    kernel = splash.make_splash_mqa_single_device(
        masks.MultiHeadMask([mask] * groups), interpret=interpret
    )
    q = q.transpose(0, 2, 1, 3).reshape(b, kv, groups, t, h) * (h**-0.5)  # kernel does not scale
    k = k.transpose(0, 2, 1, 3)  # (B, K, S, H)
    v = v.transpose(0, 2, 1, 3)
    ids = segment_ids.astype(jnp.int32)

    def one(q_g, k_g, v_g, seg):  # q_g (G, T, H); k_g, v_g (S, H); seg (T,)
        return kernel(q_g, k_g, v_g, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    per_kv_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_kv_head, in_axes=(0, 0, 0, 0))(q, k, v, ids)  # (B, K, G, T, H)
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def attend(q, k, v, segment_ids, *, impl: str, sliding_window: int = 0, interpret: bool = False,
           prefix_mask=None):
    """`interpret` runs the splash kernel through the Pallas interpreter (CPU tests); `prefix_mask` (B, T)
    makes the rows prefix-LM rows (XLA only)."""
    if prefix_mask is not None and impl in ("cudnn", "splash"):
        # Splash's masks are static, not per row; cuDNN would need a dense (B, T, T) mask and lose its causal
        # block skipping. Checked before any kernel is built.
        raise ConfigError(f"prefix-LM attention (a batch with prefix_mask) runs only on the XLA path, not "
                          f"model.attention={impl}: set model.attention=xla")
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids, sliding_window, prefix_mask=prefix_mask)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids, sliding_window)
    if impl == "splash":
        return _sharded_splash(q, k, v, segment_ids, sliding_window, interpret)
    raise ConfigError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


def _sharded_splash(q, k, v, segment_ids, sliding_window, interpret=False):
    """Runs splash per device: batch over the batch axes, heads over tensor, full sequence local."""
    from jax.sharding import PartitionSpec as P

    from jaxlm.core.sharding import BATCH_AXES

    fn = functools.partial(splash_attention, sliding_window=sliding_window, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, segment_ids)
    batch = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    heads = "tensor" if mesh.shape["tensor"] > 1 and k.shape[2] % mesh.shape["tensor"] == 0 else None
    qkv_spec = P(batch, None, heads, None)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, None)), out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, segment_ids)
