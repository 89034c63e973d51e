"""Token-level cross-entropy with a fused backward pass: the building block of every objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    logz_bt, nll_bt = token_losses(logits_btv, targets_bt)
    mask_bt = mask_bt.astype(jnp.float32)
    nll = jnp.sum(nll_bt * mask_bt)
    zl = z_loss * jnp.sum(jnp.square(logz_bt) * mask_bt)
    return nll, zl, jnp.sum(mask_bt)
