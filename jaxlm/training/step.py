"""The one step factory: `step(state, batch) -> (state, metrics)` for any objective, pure and jitted.

Everything a step needs (objective, optimizer, which params train, accumulation) is bound in by
`make_step`; the step itself has no side effects, so it is jitted with the state donated.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxlm.core.train_state import TrainState
from jaxlm.training.objectives import TOTALS, Objective

Batch = dict[str, jax.Array]


def _value_and_grads(objective: Objective, params, batch, rng, trainable: str | None):
    """((value, metrics), grads) of the objective; with `trainable`, only params[trainable] is differentiated."""
    if trainable is None:
        return jax.value_and_grad(objective.loss, has_aux=True)(params, batch, rng)
    part = lambda p: objective.loss({**params, trainable: p}, batch, rng)
    return jax.value_and_grad(part, has_aux=True)(params[trainable])


def _accumulated(objective: Objective, params, batch, rng, trainable: str | None, grad_accum: int):
    """The same sums as one pass over `batch`, computed over `grad_accum` micro-batches in a scan."""
    if grad_accum == 1:
        return _value_and_grads(objective, params, batch, rng, trainable)
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda p, b, r: _value_and_grads(objective, p, b, r, trainable), params, first, rng)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    def body(carry, xs):
        i, b = xs
        out = _value_and_grads(objective, params, b, jax.random.fold_in(rng, i), trainable)
        return jax.tree.map(jnp.add, carry, out), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
    return total


def make_step(objective: Objective, tx: optax.GradientTransformation, trainable: str | None = None,
              lr_schedule: Callable | None = None, grad_accum: int = 1):
    """A train step for `objective`. With `grad_accum` > 1 the batch is scanned in that many micro-batches;
    as the objective returns sums, the result equals one pass over the whole batch. With `trainable="lora"`
    only `params["lora"]` is differentiated and updated; the rest is frozen (it may be quantized) and has
    no optimizer state (`jaxlm.training.optim`)."""

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, next_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        (_, sums), grads = _accumulated(objective, state.params, batch, rng, trainable, grad_accum)
        weight = jnp.maximum(sums["weight"], 1.0)
        # Gradients of summed losses, normalised by every unit of the global batch.
        grads = jax.tree.map(lambda g: g / weight, grads)
        metrics = means(sums)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        all_grads = grads if trainable is None else {  # the frozen branch of the optimizer ignores these zeros
            k: (grads if k == trainable else jax.tree.map(jnp.zeros_like, v)) for k, v in state.params.items()}

        def update(params, opt_state):
            updates, opt_state = tx.update(all_grads, opt_state, params)
            if trainable is None:
                return optax.apply_updates(params, updates), opt_state
            return {**params, trainable: optax.apply_updates(params[trainable], updates[trainable])}, opt_state

        # A non-finite step leaves params and optimizer state exactly as they were. A cond, not a where
        # over every leaf, so that a finite step pays nothing for the check.
        params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params, state.opt_state)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=jax.random.key_data(next_rng))
        metrics.update(grad_norm=grad_norm, finite=finite)
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        return new_state, metrics

    return step


def means(sums: dict) -> dict:
    """Per-unit metrics from an objective's sums: each divided by the total weight, except the totals."""
    weight = jnp.maximum(sums["weight"], 1.0)
    return {k: v if k in TOTALS else v / weight for k, v in sums.items() if k != "weight"}


def make_eval_step(objective: Objective):
    """eval_step(params, batch) -> the objective's sums (weight included), without dropout."""

    def eval_step(params, batch: Batch) -> dict[str, jax.Array]:
        return objective.loss(params, batch, None)[1]

    return eval_step
