"""Sharded initialisation: shapes first (`jax.eval_shape`), then every array created in place.

No host ever holds the full model: `jax.jit(init, out_shardings=...)` makes each device build only its
own shard. The same abstract state, with shardings attached, is the target that checkpoints restore into.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlm.core.sharding import tree_shardings
from jaxlm.core.train_state import TrainState


def strip_boxes(tree):
    """Removes the logical-axis boxes without applying sharding constraints (safe outside jit)."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def boxed_params(model: nn.Module, seq_len: int = 8):
    """The model's params as ShapeDtypeStructs still boxed with their logical axis names."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def abstract_params(model: nn.Module, seq_len: int = 8):
    """Unboxed ShapeDtypeStructs of the parameters, for building masks and counting."""
    return strip_boxes(boxed_params(model, seq_len))


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, seed: int) -> Callable[[], TrainState]:
    """Returns init() -> TrainState with logically-partitioned (boxed) params and optimizer state."""

    def init() -> TrainState:
        params_rng, train_rng = jax.random.split(jax.random.key(seed))
        tokens = jnp.zeros((1, 8), jnp.int32)
        params = model.init(params_rng, tokens)["params"]
        # The optimizer sees the boxed params, so Adam moments inherit their logical axis names.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(train_rng))

    return init


def abstract_state(init: Callable[[], TrainState], mesh: Mesh) -> TrainState:
    """The state's ShapeDtypeStructs with their target shardings; nothing is allocated."""
    boxed = jax.eval_shape(init)
    shardings = tree_shardings(boxed, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), strip_boxes(boxed), shardings)


def materialize(init: Callable[[], TrainState], abstract: TrainState, keep: Callable = lambda s: s):
    """Runs `init` with every array of the state born on its own shards, as `abstract` lays them out.

    `keep(state)` selects the part to build (e.g. all but params that are loaded instead); XLA never
    computes the rest, so loaded weights do not first exist as random ones."""
    shardings = jax.tree.map(lambda a: a.sharding, keep(abstract))
    return jax.jit(lambda: keep(strip_boxes(init())), out_shardings=shardings)()


def create(init: Callable[[], TrainState], mesh: Mesh) -> tuple[TrainState, TrainState]:
    """Returns (state, abstract state)."""
    abstract = abstract_state(init, mesh)
    return materialize(init, abstract), abstract
