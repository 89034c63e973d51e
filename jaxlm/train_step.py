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


@jax.custom_vjp
def _token_losses(logits_btv, targets_bt):
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


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def cross_entropy(logits_btv, targets_bt, mask_bt, z_loss: float = 0.0):
    """Returns (sum of token losses, sum of z-losses, token count); float32 throughout."""
    logz_bt, nll_bt = _token_losses(logits_btv, targets_bt)
    mask_bt = mask_bt.astype(jnp.float32)
    nll = jnp.sum(nll_bt * mask_bt)
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

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A non-finite step leaves params and optimizer state exactly as they were. A cond, not a
        # where over every leaf, so that a finite step pays nothing for the check.
        params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params, state.opt_state)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state,
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


def make_finetune_step(loss_fn: Callable, tx: optax.GradientTransformation, trainable: str | None = None,
                       lr_schedule: Callable | None = None, grad_accum: int = 1):
    """A step for `loss_fn(params, batch, rng) -> (loss, metrics)` (SFT and DPO in `jaxlm.finetune`).

    `metrics["weight"]` is how many units the loss averages over (SFT: loss tokens, DPO: pairs); with
    `grad_accum` > 1 the batch is split into that many micro-batches, scanned, and their losses, gradients
    and metrics are combined with those weights, so the step equals one over the whole batch
    ("tokens" is summed). With `trainable="lora"` only `params["lora"]` is differentiated and updated;
    the rest of the params is frozen, may be quantized, and holds no optimizer state (`jaxlm.optim`).
    """

    def value_and_grads(params, batch, rng):
        if trainable is None:
            return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        part = lambda p: loss_fn({**params, trainable: p}, batch, rng)
        return jax.value_and_grad(part, has_aux=True)(params[trainable])

    def accumulated(params, batch, rng):
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
        shapes = jax.eval_shape(value_and_grads, params, jax.tree.map(lambda x: x[0], micro), rng)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        def body(carry, xs):
            i, b = xs
            (loss, metrics), grads = value_and_grads(params, b, jax.random.fold_in(rng, i))
            w = metrics["weight"]
            (sum_loss, sum_metrics), sum_grads = carry
            sum_metrics = {k: v + (metrics[k] if k in _SUMMED else metrics[k] * w) for k, v in sum_metrics.items()}
            return ((sum_loss + loss * w, sum_metrics), jax.tree.map(lambda s, g: s + g * w, sum_grads, grads)), None

        ((loss, metrics), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
        total = jnp.maximum(metrics["weight"], 1e-9)
        metrics = {k: v if k in _SUMMED else v / total for k, v in metrics.items()}
        return (loss / total, metrics), jax.tree.map(lambda g: g / total, grads)

    def finetune_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, next_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        compute = value_and_grads if grad_accum == 1 else accumulated
        (loss, metrics), grads = compute(state.params, batch, rng)
        if trainable is None:
            all_grads = grads
        else:  # the frozen branch of the optimizer ignores these zeros; nothing reads its updates, so XLA drops them
            all_grads = {k: (grads if k == trainable else jax.tree.map(jnp.zeros_like, v))
                         for k, v in state.params.items()}
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, opt_state = tx.update(all_grads, opt_state, params)
            if trainable is None:
                return optax.apply_updates(params, updates), opt_state
            return {**params, trainable: optax.apply_updates(params[trainable], updates[trainable])}, opt_state

        params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params, state.opt_state)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=jax.random.key_data(next_rng))
        metrics = {k: v for k, v in metrics.items() if k != "weight"}
        metrics.update(loss=loss, grad_norm=grad_norm, finite=finite)
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        return new_state, metrics

    return finetune_step


_SUMMED = ("tokens", "weight")  # metrics that add up over micro-batches; the rest are weighted means
