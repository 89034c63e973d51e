"""The training state, the loss, and the pure `train_step` / `eval_step` functions.

`train_step(state, batch) -> (state, metrics)` has no side effects: it is jitted with the state donated,
and everything it needs (model, optimizer, settings) is bound in by `make_train_step`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids, loss_mask: each (B, T)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so that Orbax stores it as a plain array


def cross_entropy(logits_btv, targets_bt, mask_bt, z_loss: float = 0.0):
    """Returns (sum of token losses, sum of z-losses, token count); float32 throughout."""
    logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    mask_bt = mask_bt.astype(jnp.float32)
    nll = jnp.sum((logz_bt - target_logit_bt) * mask_bt)
    zl = z_loss * jnp.sum(jnp.square(logz_bt) * mask_bt)
    return nll, zl, jnp.sum(mask_bt)


def loss_fn(params, apply_fn: Callable, batch: Batch, z_loss: float = 0.0):
    logits = apply_fn({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    nll, zl, count = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
    return nll, zl, count


def _grads(params, apply_fn, batch, z_loss, grad_accum: int):
    """Sum of (loss, z-loss) gradients and sums over `grad_accum` micro-batches, scanned."""

    def total(p, b):
        nll, zl, count = loss_fn(p, apply_fn, b, z_loss)
        return nll + zl, (nll, count)

    grad_fn = jax.value_and_grad(total, has_aux=True)
    if grad_accum == 1:
        (_, (nll, count)), grads = grad_fn(params, batch)
        return grads, nll, count

    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def body(carry, b):
        grads, nll, count = carry
        (_, (n, c)), g = grad_fn(params, b)
        return (jax.tree.map(jnp.add, grads, g), nll + n, count + c), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, nll, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
    return grads, nll, count


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, z_loss: float, grad_accum: int,
                    lr_schedule: Callable | None = None):
    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        grads, nll, count = _grads(state.params, apply_fn, batch, z_loss, grad_accum)
        count = jnp.maximum(count, 1.0)
        # Gradients of summed losses, normalised by all tokens of the global batch.
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = nll / count
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # A non-finite step leaves params and optimizer state exactly as they were.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        return new_state, metrics

    return train_step


def make_eval_step(apply_fn: Callable):
    def eval_step(params, batch: Batch) -> dict[str, jax.Array]:
        nll, _, count = loss_fn(params, apply_fn, batch)
        return {"nll": nll, "tokens": count}

    return eval_step
