"""Pipeline parallelism over the `stage` mesh axis: the scanned layers split into stages that pass
micro-batches to their neighbour.

The stacked layer weights (L, ...) are sharded over `stage`, so stage s holds a contiguous run of L/S
layers, exactly as a checkpoint stores them: a pipelined run resumes on a mesh without stages and back.
Inside `jax.shard_map` (manual over `stage` only; data, fsdp and tensor stay automatic inside a stage)
every stage runs the same loop of M*R + S - 1 ticks. At tick t stage s works on item i = t - s of its
stream: micro-batch i % M through its layer chunk i // M. Its output goes to stage s+1 with
`ppermute`; the last stage's output goes round the ring to stage 0, which keeps a buffer of M
micro-batches: it feeds them in (repeat 0), takes the last stage's results back in place of them (the
next repeat starts M ticks later, after they have arrived, since M >= S), and after the last repeat
holds the model's output.

- GPipe: R = 1, each stage's L/S layers as one chunk.
- Circular (R > 1): virtual stage v = r*S + s holds layers [v*Lc, (v+1)*Lc) with Lc = L/(S*R), so each
  micro-batch goes round the ring R times and the bubble, (S-1)/(M*R + S-1) of the ticks, is R times
  smaller. Its weights are not contiguous per stage, so each step reshards the stacked weights into
  that order (an all-to-all of (R-1)/R of the layer weights over `stage`, and the gradients back).

Every stage computes during the bubble too (on zeros) and discards the result: that is the bubble's cost.
The embedding, final norm and head run outside the pipeline, replicated over `stage`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.core.config import ConfigError

AXIS = "stage"


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Micro-batches per step (0: chosen by `microbatches_for`) and layer chunks per stage."""

    microbatches: int = 0
    repeats: int = 1


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The fraction of pipeline ticks a stage spends idle (filling and draining the pipe)."""
    if stages <= 1:
        return 0.0
    return (stages - 1) / (microbatches * repeats + stages - 1)


def microbatches_for(pipeline: Pipeline, stages: int, rows_per_shard: int) -> int:
    """The micro-batch count, checked: at least one per stage and dividing each batch shard's rows.

    `rows_per_shard` is the rows of one step's (micro-)batch on one data shard; 0 microbatches picks the most,
    up to 4 per stage, that divide it."""
    if pipeline.microbatches:
        m = pipeline.microbatches
        if m < stages:
            raise ConfigError(f"train.pipeline_microbatches={m} is fewer than the {stages} pipeline stages "
                              f"(mesh.stage); use at least {stages}")
        if rows_per_shard % m:
            raise ConfigError(f"train.pipeline_microbatches={m} does not divide the {rows_per_shard} rows each "
                              f"batch shard gets per step; change it or train.batch_size")
        return m
    fitting = [m for m in range(stages, 4 * stages + 1) if rows_per_shard % m == 0]
    if not fitting:
        raise ConfigError(f"each batch shard gets {rows_per_shard} rows per step, too few to split into "
                          f"{stages}..{4 * stages} micro-batches for {stages} pipeline stages (mesh.stage); "
                          f"raise train.batch_size or set train.pipeline_microbatches")
    return max(fitting)


def check_layers(num_layers: int, stages: int, repeats: int) -> None:
    if num_layers % (stages * repeats):
        raise ConfigError(f"model.num_layers={num_layers} is not divisible by mesh.stage={stages} x "
                          f"train.pipeline_repeats={repeats}; change one of them")


def _to_stage_major(stacked, stages: int, repeats: int):
    """(L, ...) -> (S, R, Lc, ...): stage s's chunk r is virtual stage r*S + s."""
    def one(w):
        lc = w.shape[0] // (stages * repeats)
        return jnp.swapaxes(w.reshape(repeats, stages, lc, *w.shape[1:]), 0, 1)

    return jax.tree.map(one, stacked)


def run(layer_fn: Callable, stacked, x_btd, positions_bt, segment_ids_bt, pipeline: Pipeline, mesh):
    """The scanned layers' output for x (B, T, D), pipelined over the mesh's `stage` axis.

    `layer_fn(layer_params, x, positions, segment_ids) -> x` runs one layer; `stacked` holds every layer's
    params with the leading layer axis."""
    stages, repeats = mesh.shape[AXIS], pipeline.repeats
    check_layers(jax.tree.leaves(stacked)[0].shape[0], stages, repeats)
    b = x_btd.shape[0]
    m = pipeline.microbatches
    # Micro-batch j takes rows j, j+M, ...: each data shard's contiguous rows split evenly into all of them.
    split = lambda a: jnp.swapaxes(a.reshape(b // m, m, *a.shape[1:]), 0, 1)
    weights = _to_stage_major(stacked, stages, repeats)

    def per_stage(w, x_mb, pos_mb, seg_mb):
        w = jax.tree.map(lambda a: a[0], w)  # (R, Lc, ...): this stage's chunks
        return _ticks(layer_fn, w, x_mb, pos_mb, seg_mb, stages, repeats)[None]

    out = jax.shard_map(
        per_stage, mesh=mesh, in_specs=(P(AXIS), P(), P(), P()), out_specs=P(AXIS), axis_names={AXIS},
        check_vma=False,
    )(weights, split(x_btd), split(positions_bt), split(segment_ids_bt))
    # Stage 0's buffer holds the result; the other stages' copies are unused.
    return jnp.swapaxes(out[0], 0, 1).reshape(x_btd.shape)


def _ticks(layer_fn, w, x_mb, pos_mb, seg_mb, stages: int, repeats: int):
    """One stage's loop; returns its buffer (M, b, T, D), the model's output on stage 0."""
    s = jax.lax.axis_index(AXIS)
    m = x_mb.shape[0]
    items = m * repeats
    ring = [(i, (i + 1) % stages) for i in range(stages)]

    def chunk(x, r, j):
        w_r = jax.tree.map(lambda a: a[r], w)
        pos, seg = pos_mb[j], seg_mb[j]
        x, _ = jax.lax.scan(lambda h, p: (layer_fn(p, h, pos, seg), None), x, w_r)
        return x

    def tick(carry, t):
        buffer, received = carry
        i = jnp.clip(t - s, 0, items - 1)
        x = jnp.where(s == 0, buffer[t % m], received)
        out = chunk(x, i // m, i % m)
        arrived = jax.lax.ppermute(out, AXIS, ring)  # on stage 0: the last stage's item t - (S-1)
        done = t - (stages - 1)
        keep = (s == 0) & (done >= 0) & (done < items)
        slot = jnp.clip(done, 0, items - 1) % m
        buffer = jnp.where(keep, jax.lax.dynamic_update_index_in_dim(buffer, arrived, slot, 0), buffer)
        return (buffer, arrived), None

    (buffer, _), _ = jax.lax.scan(tick, (x_mb, jnp.zeros_like(x_mb[0])), jnp.arange(items + stages - 1))
    return buffer
