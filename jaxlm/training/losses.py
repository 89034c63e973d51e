"""Token-level cross-entropy with a fused backward pass, whole or vocabulary-tiled: the building block of
every objective."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlm.core.config import ConfigError
from jaxlm.core.sharding import BATCH_AXES, constrain
from jaxlm.model.layers import dense
from jaxlm.model.transformer import BTV


@jax.custom_vjp
def token_losses(logits_btv, targets_bt):
    """Per-token (logsumexp, logsumexp - target logit)."""
    return _token_losses_fwd(logits_btv, targets_bt)[0]


def _token_losses_fwd(logits_btv, targets_bt):
    logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return (logz_bt, logz_bt - target_logit_bt), (logits_btv, targets_bt, logz_bt)


def _token_losses_bwd(res, cotangents):
    # One fused pass over the (B, T, V) logits: softmax * (g_logz + g_nll) - onehot * g_nll. Autodiff
    # would instead scatter the target gradient into a separate zero-filled (B, T, V) array.
    logits_btv, targets_bt, logz_bt = res
    g_logz, g_nll = cotangents
    probs = jnp.exp(logits_btv - logz_bt[..., None])
    is_target = jnp.arange(logits_btv.shape[-1]) == targets_bt[..., None]
    grad = probs * (g_logz + g_nll)[..., None] - jnp.where(is_target, g_nll[..., None], 0.0)
    return grad.astype(logits_btv.dtype), None


token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def cross_entropy(logits_btv, targets_bt, mask_bt, z_loss: float = 0.0):
    """Returns (sum of token losses, sum of z-losses, token count); float32 throughout."""
    return masked_sums(*token_losses(logits_btv, targets_bt), mask_bt, z_loss)


# --- Vocabulary-tiled cross-entropy -------------------------------------------------------------------
# The head matmul and the loss in one function, over chunks of the sequence: each chunk's (B, T/C, V)
# logits exist only inside one iteration of a scan, in the forward pass and again (recomputed) in the
# backward, so neither the logits nor their gradient is ever live at full (B, T, V) size.

LOGITS_BUDGET = 1 << 30  # bytes of float32 logits per device above which `loss_chunks=0` tiles


def auto_chunks(batch_per_device: int, tokens_per_row: int, vocab_per_device: int, budget: int = LOGITS_BUDGET) -> int:
    """The fewest chunks (a divisor of the row's tokens on one device) whose float32 logits per device fit
    in `budget`; 1 (untiled) when the whole (B, T, V) logits already do."""
    for chunks in range(1, tokens_per_row + 1):
        if tokens_per_row % chunks == 0 and batch_per_device * (tokens_per_row // chunks) * vocab_per_device * 4 <= budget:
            return chunks
    return tokens_per_row


def resolve_chunks(requested: int, batch: int, seq_len: int, vocab: int, mesh_shape: dict | None = None) -> int:
    """`train.loss_chunks` for a (batch, seq_len) step: as given, or (0) by `auto_chunks` for the per-device
    shapes on the mesh (`mesh_shape`, or the one set with `jax.set_mesh`)."""
    if mesh_shape is None:
        mesh = jax.sharding.get_abstract_mesh()
        mesh_shape = {} if mesh.empty else dict(mesh.shape)
    size = lambda *axes: math.prod(mesh_shape.get(a, 1) for a in axes)
    seq = size("sequence")
    if requested:
        if seq_len % (requested * seq):
            raise ConfigError(f"train.loss_chunks={requested} x mesh.sequence={seq} does not divide "
                              f"train.seq_len={seq_len}; pick a divisor, or 0 to choose automatically")
        return requested
    tp = size("tensor")
    return auto_chunks(-(-batch // size(*BATCH_AXES)), seq_len // seq, vocab // tp if vocab % tp == 0 else vocab)


def head_logits(h_btd, w_vd):
    """The untiled logits (B, T, V), float32, sharded over the vocabulary like the model's own."""
    return constrain(_chunk_logits(h_btd, w_vd), BTV)


def _chunk_logits(h_bcd, w_vd):
    # The model's own head matmul (jaxlm.model.transformer), then float32 like its logits.
    return dense(h_bcd, w_vd.T).astype(jnp.float32)


def _split(x, chunks):
    """(B, T, ...) -> (C, B, T/C, ...): chunk c holds tokens c, c+C, ..., so that a sequence-sharded T keeps
    its sharding inside every chunk; the scan runs over the leading chunk axis."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunks, chunks, *x.shape[2:]), 2, 0)


def _merge(x_cbt):
    c, b, tc = x_cbt.shape[:3]
    return jnp.moveaxis(x_cbt, 0, 2).reshape(b, tc * c, *x_cbt.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tiled_token_losses(h_btd, w_vd, targets_bt, chunks: int):
    """`token_losses(h @ w.T, targets)` computed `chunks` pieces of the sequence at a time; same outputs."""
    return _tiled_fwd(h_btd, w_vd, targets_bt, chunks)[0]


def _tiled_fwd(h_btd, w_vd, targets_bt, chunks):
    def one(_, xs):
        h, tgt = xs
        logits = _chunk_logits(h, w_vd)
        logz = jax.nn.logsumexp(logits, axis=-1)
        return None, (logz, logz - jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0])

    _, (logz, nll) = jax.lax.scan(one, None, (_split(h_btd, chunks), _split(targets_bt, chunks)))
    logz_bt = _merge(logz)
    return (logz_bt, _merge(nll)), (h_btd, w_vd, targets_bt, logz_bt)


def _tiled_bwd(chunks, res, cotangents):
    h_btd, w_vd, targets_bt, logz_bt = res
    g_logz, g_nll = cotangents

    def one(dw, xs):
        h, tgt, logz, gz, gn = xs
        logits = _chunk_logits(h, w_vd)
        probs = jnp.exp(logits - logz[..., None])
        is_target = jnp.arange(logits.shape[-1]) == tgt[..., None]
        g = (probs * (gz + gn)[..., None] - jnp.where(is_target, gn[..., None], 0.0)).astype(w_vd.dtype)
        b, c, v = g.shape
        g2 = g.reshape(b * c, v)
        dh = (g2 @ w_vd).reshape(h.shape)
        dw = dw + jnp.dot(g2.T, h.reshape(b * c, -1), preferred_element_type=jnp.float32)
        return dw, dh

    xs = tuple(_split(x, chunks) for x in (h_btd, targets_bt, logz_bt, g_logz, g_nll))
    dw, dh = jax.lax.scan(one, jnp.zeros(w_vd.shape, jnp.float32), xs)
    return _merge(dh).astype(h_btd.dtype), dw.astype(w_vd.dtype), None


tiled_token_losses.defvjp(_tiled_fwd, _tiled_bwd)


def masked_sums(logz_bt, nll_bt, mask_bt, z_loss: float = 0.0):
    """(sum of token losses, sum of z-losses, token count) over the tokens `mask_bt` marks; float32."""
    mask_bt = mask_bt.astype(jnp.float32)
    nll = jnp.sum(nll_bt * mask_bt)
    zl = z_loss * jnp.sum(jnp.square(logz_bt) * mask_bt)
    return nll, zl, jnp.sum(mask_bt)
