"""The one logical-axis rule table, and the translation from logical names to mesh shardings.

Models name array dimensions logically ("embed", "mlp", "activation_batch"); this table alone decides
which mesh axes those names are split over. Parameters use plain names, activations the
`activation_` prefix, so that a weight's embed dimension can be fsdp-sharded while the activations'
embed dimension is not.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),  # context-parallel devices share the weights' memory like FSDP
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", "stage"),  # pipeline stages hold contiguous runs of the scanned layers
    ("norm", None),
    ("labels", None),  # a classifier's few outputs: replicated
    ("expert", "expert"),
    # Activations.
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

BATCH_AXES = ("data", "fsdp", "expert")


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes a dimension cannot be split over evenly (e.g. 2 KV heads over tensor=4), and axes of
    size 1 (a mesh without pipeline stages leaves the layer axis unsharded)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept, size = [], 1
        for name in names:
            if mesh.shape[name] > 1 and dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*fitted)


def logical_sharding(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    spec = nn.logical_to_mesh_axes(names, LOGICAL_AXIS_RULES)
    return NamedSharding(mesh, _fit(spec, shape, mesh))


def logical_spec(names: tuple, shape: tuple[int, ...], mesh) -> PartitionSpec:
    """The PartitionSpec, fitted to `shape` on `mesh` (a Mesh or AbstractMesh), for logical `names`.

    An entry may be a tuple of logical names: one dimension flattened from several, major first (tokens
    flattened from batch and length), split over their mesh axes in that order, as far as they fit."""
    groups = [name if isinstance(name, tuple) else (name,) for name in names]
    per_name = iter(nn.logical_to_mesh_axes([n for group in groups for n in group], LOGICAL_AXIS_RULES))
    merged = []
    for group in groups:
        axes = [next(per_name) for _ in group]
        merged.append(tuple(a for entry in axes for a in ((entry,) if isinstance(entry, str) else entry or ())))
    return _fit(PartitionSpec(*merged), shape, mesh)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's sharding by logical names, under the mesh set with `jax.set_mesh`.

    Without a mesh (plain single-device use) it does nothing.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = _fit(nn.logical_to_mesh_axes(names, LOGICAL_AXIS_RULES), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def path_str(path) -> str:
    """"layers/attn/q" for a key path from `jax.tree_util.tree_map_with_path`."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def tree_shardings(abstract_tree, mesh: Mesh):
    """Shardings for a pytree of (possibly `nn.LogicallyPartitioned`) ShapeDtypeStructs.

    Leaves without logical names (step counters, RNG keys, optimizer scalars) are replicated.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return logical_sharding(leaf.names, leaf.value.shape, mesh)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    return NamedSharding(mesh, PartitionSpec(axes, *(None,) * (ndim - 1)))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over the batch axes.

    Every process passes only its own rows; the global batch is their concatenation in process order.
    """
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()
    }


def whole_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays sharded over the batch axes from a whole batch that every process holds alike (GRPO's
    rollouts): each process places its own rows."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, v.shape)
            for k, v in batch.items()}


def local_rows(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, np.ndarray]:
    """This process's share of a whole batch that every process holds alike: the rows `global_batch` takes
    from it to rebuild that batch (all of them with one process)."""
    if jax.process_count() == 1:
        return batch
    out = {}
    for k, v in batch.items():
        indices = batch_sharding(mesh, v.ndim).addressable_devices_indices_map(v.shape).values()
        spans = sorted({(i[0].start or 0, v.shape[0] if i[0].stop is None else i[0].stop) for i in indices})
        out[k] = np.concatenate([v[a:b] for a, b in spans])
    return out


def batch_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
