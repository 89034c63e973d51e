"""AdamW with warmup and decay, clipping, a weight-decay mask and a trainable-parameter mask.

Both masks come from regex rules over parameter paths such as "layers/attn/q". Frozen parameters go
through `optax.set_to_zero` inside `optax.multi_transform`, so they get no update and no Adam state.
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import optax

from jaxlm.core.config import OptimConfig
from jaxlm.core.sharding import path_str

TRAIN, FREEZE = "train", "freeze"


def path_mask(params, patterns: tuple[str, ...] | list[str]) -> dict:
    """A pytree of bools: True where any regex matches the parameter's path."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(lambda p, _: any(c.search(path_str(p)) for c in compiled), params)


def schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = config.lr * config.min_lr_ratio
    if config.decay == "cosine":
        after = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.min_lr_ratio)
    elif config.decay == "linear":
        after = optax.linear_schedule(config.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(config.lr)
    if not warmup:
        return after
    # Warmup reaches lr/warmup at step 0 (not 0, which would waste the first step) and lr at warmup-1.
    ramp = optax.linear_schedule(config.lr / warmup, config.lr, warmup - 1)
    return optax.join_schedules([ramp, after], [warmup])


def build_optimizer(
    config: OptimConfig, total_steps: int, params, trainable: Callable | dict | None = None
) -> optax.GradientTransformation:
    """`trainable` is a bool pytree (or a function of params returning one); None trains everything."""
    decay_mask = jax.tree.map(lambda no_decay: not no_decay, path_mask(params, config.no_decay))
    adamw = optax.adamw(
        schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay, mask=decay_mask,
    )
    # Clip inside the trainable branch so that frozen gradients do not count towards the norm.
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw) if config.clip_norm else adamw
    if trainable is None:
        return tx
    mask = trainable(params) if callable(trainable) else trainable
    labels = jax.tree.map(lambda t: TRAIN if t else FREEZE, mask)
    return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)
