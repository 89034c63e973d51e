"""Expert parallelism: the experts are split over the `expert` mesh axis and tokens travel to them.

With ep devices on the `expert` axis, device j holds experts [j*E/ep, (j+1)*E/ep) (the rule
("expert", "expert") shards the weights' E axis), and the tokens are split over the batch axes, `expert`
among them, so each device routes its own tokens. Inside `jax.shard_map` (manual over the whole mesh),
each device:

1. sorts its A = n*k local (token, expert) assignments by expert (`experts.sort_assignments`); the experts
   of one device are contiguous, so this also groups them by destination device;
2. writes each destination's rows into its own slot of A rows of a send buffer (ep*A, D), zeros after
   them, plus each row's expert index on the destination;
3. exchanges the slots with `jax.lax.all_to_all` over `expert`: slot i of what arrives came from device i;
4. runs the received rows through its local experts with experts.py's grouped matmul (`experts.expert_outputs`;
   the zero padding rows go to local expert 0 and come out exactly zero);
5. sends the results back with the same all_to_all, gathers each assignment's row from its slot, and
   sums each token's k rows with its routing weights (`experts.combine`).

Worst-case buffers: a device may route all A of its assignments to one device, and any device may
receive A rows from every device, so every slot holds A rows. Nothing is ever dropped, but the send and
receive buffers are (ep*A, D) and the expert compute runs over ep*A rows (+ block padding): ep times what
the device's own assignments need, in memory and, with the `blocks` matmul, in FLOPs. A balanced router
fills about 1/ep of it. `jax.lax.ragged_all_to_all` would send only the real rows into a smaller buffer,
but XLA:CPU does not implement it ("not supported by XLA:CPU ThunkEmitter"), and a path that cannot be
tested on this project's CPU test meshes is not written: TPU and GPU use the all_to_all too.

Other axes on the same mesh:
- data / fsdp / sequence split the tokens with `expert` (they are the flattened batch and length axes);
  the weights' embed dimension, split over fsdp and sequence, is all-gathered inside (FSDP), and its
  gradient reduce-scattered back by the all-gather's transpose.
- tensor splits each expert's F (mlp) dimension; the tokens are replicated over it, so each tensor
  device computes its slice of the SwiGLU and the outputs are psum-ed over tensor (Megatron's MLP),
  after the return trip, where the partial results are smallest (n, D). The partial sums are added in
  the compute dtype, as Megatron does, so in bfloat16 the result differs from one device's by rounding.
The specs come from the logical rules in `jaxlm.core.sharding`, so that table stays the one source of
truth for how the weights and tokens are laid out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.core.config import ModelConfig
from jaxlm.core.sharding import logical_spec
from jaxlm.model import experts

AXIS = "expert"
# The flattened (batch*length) tokens: one dimension split over the batch axes, then over sequence.
TOKENS = ("activation_batch", "activation_length")


def active() -> bool:
    """Whether the layer runs here: under any mesh of more than one device (`jax.set_mesh`). Even without
    an `expert` axis, the sort and gathers of the dropless path must run per device, on each device's own
    tokens: left to the SPMD partitioner, a global argsort over the batch-sharded tokens is replicated,
    and every device would sort, gather and multiply the whole batch's assignments."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry, as a tuple."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def layout(num_tokens: int, shapes: dict[str, tuple[int, ...]], mesh):
    """(token axes, {weight name: spec}, embed axes, mlp axes) from the logical rules, checked.

    `shapes` holds the shapes of the expert weights named in `experts.EXPERT_WEIGHTS`."""
    names = {name: n for name, (n, _) in experts.EXPERT_WEIGHTS.items()}
    specs = {name: logical_spec(n, shapes[name], mesh) for name, n in names.items()}
    per_name = {name: _axes(entry) for name, entry in zip(names["gate"], specs["gate"])}
    if mesh.shape.get(AXIS, 1) > 1 and per_name["expert"] != (AXIS,):
        raise ValueError(f"the {shapes['gate'][0]} experts do not split over mesh.expert={mesh.shape[AXIS]} "
                         f"(the rules give {per_name['expert']}); mesh.expert must divide model.num_experts")
    tokens = _axes(logical_spec((TOKENS,), (num_tokens,), mesh)[0])
    # The psum over the mlp axes adds partial sums of the *same* tokens: the tokens must not split over them.
    both = set(per_name["mlp"]) & set(tokens)
    if both:
        raise ValueError(f"the tokens and the experts' mlp dimension both split over {sorted(both)}")
    return tokens, specs, per_name["embed"], per_name["mlp"]


def dropless(x_nd, experts_nk, weights_nk, gate, up, down, c: ModelConfig):
    """`experts.dropless` over the current mesh, the experts split over its `expert` axis: (N, D)."""
    mesh = jax.sharding.get_abstract_mesh()
    shapes = {"gate": gate.shape, "up": up.shape, "down": down.shape}
    tokens, specs, embed, mlp = layout(x_nd.shape[0], shapes, mesh)
    token_spec = P(tokens or None, None)
    body = functools.partial(_per_device, num_experts=c.num_experts, embed=embed, mlp=mlp,
                             impl=experts.resolve_matmul(c.moe_matmul))
    # check_vma=False as elsewhere in jaxlm: the output is replicated over the axes its spec leaves out
    # (tensor after the psum; any batch axis the token count could not split over), which is what the
    # transpose of an unchecked shard_map assumes when it reduces the replicated inputs' gradients.
    return jax.shard_map(
        body, mesh=mesh, in_specs=(token_spec, token_spec, token_spec, specs["gate"], specs["up"], specs["down"]),
        out_specs=token_spec, check_vma=False,
    )(x_nd, experts_nk, weights_nk, gate, up, down)


def _per_device(x_nd, experts_nk, weights_nk, gate, up, down, *, num_experts, embed, mlp, impl):
    """One device's tokens through their experts wherever those live: (n, D), summed over `mlp` axes."""
    ep = jax.lax.axis_size(AXIS)
    if embed:  # FSDP: the full embed dimension of this device's experts, for this layer only
        gate, up = (jax.lax.all_gather(w, embed, axis=1, tiled=True) for w in (gate, up))
        down = jax.lax.all_gather(down, embed, axis=2, tiled=True)
    source_s, expert_s, slot_a = send_layout(experts_nk, num_experts, ep)
    n = x_nd.shape[0]
    x_sd = jnp.take(jnp.concatenate([x_nd, jnp.zeros_like(x_nd[:1])]), source_s, axis=0)  # n: zero row
    # Slot i of the send buffer goes to device i; slot i of the result came from device i.
    exchange = (lambda a: jax.lax.all_to_all(a, AXIS, 0, 0, tiled=True)) if ep > 1 else (lambda a: a)
    y_sd = experts.expert_outputs(exchange(x_sd), exchange(expert_s)[:, None], gate, up, down,
                              num_experts // ep, impl)[:, 0]
    y_nkd = jnp.take(exchange(y_sd), slot_a, axis=0).reshape(n, experts_nk.shape[1], -1)
    y_nd = experts.combine(y_nkd, weights_nk)
    return jax.lax.psum(y_nd, mlp) if mlp else y_nd


def send_layout(experts_nk, num_experts: int, ep: int):
    """Where each local assignment travels, in a send buffer of ep slots of A = n*k rows each.

    Returns (token of each send row (ep*A,), with n for an empty row; the row's expert index on its
    destination device (ep*A,), 0 for an empty row; the send row of each assignment (A,), token-major),
    all int32. Slot j holds, from its start, the assignments to device j's experts sorted by expert."""
    n, k = experts_nk.shape
    a = n * k
    local = num_experts // ep
    flat_a = experts_nk.reshape(-1)
    order_a, sizes_e = experts.sort_assignments(experts_nk, num_experts)
    count_j = jnp.sum(sizes_e.reshape(ep, local), axis=1)
    start_j = jnp.cumsum(count_j) - count_j  # device j's first assignment in sorted order
    rank = jnp.arange(a, dtype=jnp.int32)
    filled_jr = rank[None, :] < count_j[:, None]
    assignment_jr = order_a[jnp.minimum(start_j[:, None] + rank[None, :], a - 1)]
    source = jnp.where(filled_jr, assignment_jr // k, n)
    expert = jnp.where(filled_jr, flat_a[assignment_jr] % local, 0)
    device_s = flat_a[order_a] // local  # the destination of each sorted assignment
    row_s = device_s * a + rank - start_j[device_s]
    row_a = jnp.zeros((a,), jnp.int32).at[order_a].set(row_s.astype(jnp.int32))
    return source.reshape(-1).astype(jnp.int32), expert.reshape(-1).astype(jnp.int32), row_a
