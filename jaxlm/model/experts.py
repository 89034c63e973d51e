"""Grouped expert compute: k of E SwiGLU experts per token, given the routing (`jaxlm.model.moe` routes).

Dropless by default: the token-expert assignments are sorted by expert and multiplied with a grouped
matmul, so no token is dropped whatever the routing. Two grouped matmuls are provided:
- `ragged_dot`: `jax.lax.ragged_dot` over the sorted rows; native on TPU and GPU. XLA:CPU lowers it to one
  masked dense matmul per expert (E times the work), so CPU uses instead
- `blocks`: the sorted rows are laid out in fixed-size blocks, each holding one expert's rows (a group's last
  block is zero-padded), and one batched matmul multiplies every block by its expert's weights.
With a capacity factor the experts instead take fixed-size buffers filled with one-hot einsums
(GShard/Switch), dropping and counting the assignments that overflow.

These run on one device's tokens and experts; `jaxlm.model.expert_parallel` runs them over a mesh.
Shape letters: N tokens, D model width, E experts, F expert MLP width, A = N*k assignments, C capacity.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlm.core.config import ModelConfig

EXPERT_WEIGHTS = {  # name: (logical names, which of (D, F) each axis after the expert axis is)
    "gate": (("expert", "embed", "mlp"), ("D", "F")),
    "up": (("expert", "embed", "mlp"), ("D", "F")),
    "down": (("expert", "mlp", "embed"), ("F", "D")),
}


def swiglu_experts(x_md, gate, up, down, matmul):
    """down(silu(x @ gate) * (x @ up)) with `matmul(x, w)` the grouped matmul of one layout."""
    h = jax.nn.silu(matmul(x_md, gate)) * matmul(x_md, up)
    return matmul(h, down)


# ---- dropless: sorted assignments, grouped matmul ---------------------------------------------------------

def sort_assignments(experts_nk, num_experts: int):
    """(order (A,), group sizes (E,)): the assignments (token-major, k per token) sorted stably by expert."""
    flat_a = experts_nk.reshape(-1)
    order_a = jnp.argsort(flat_a, stable=True)
    return order_a, jnp.bincount(flat_a, length=num_experts).astype(jnp.int32)


def block_size(assignments: int, num_experts: int) -> int:
    """Rows per block: a power of two, small enough that the padding (one block per expert) stays within a
    quarter of the assignments, and at most 256. XLA:CPU's batched matmul is slow on short blocks and the
    padding grows with long ones: at moe_tiny's shape (4096 assignments, 8 experts) 128-256 rows were
    fastest, 64 and 512 about 20% slower (forward + backward)."""
    return int(min(256, max(8, 2 ** math.floor(math.log2(max(1, assignments // (4 * num_experts)))))))


def block_layout(group_sizes_e, assignments: int, block: int):
    """(destination row of each sorted assignment (A,), expert of each block (nb,), rows nb*block).

    Each expert's rows start on a block boundary; nb = ceil(A / block) + E bounds the blocks any routing needs.
    """
    num_experts = group_sizes_e.shape[0]
    blocks = -(-assignments // block) + num_experts
    padded_e = -(-group_sizes_e // block) * block
    start_e = jnp.cumsum(padded_e) - padded_e
    group_start_e = jnp.cumsum(group_sizes_e) - group_sizes_e
    sorted_expert_a = jnp.repeat(jnp.arange(num_experts), group_sizes_e, total_repeat_length=assignments)
    rank_a = jnp.arange(assignments) - group_start_e[sorted_expert_a]
    dest_a = start_e[sorted_expert_a] + rank_a
    block_start = jnp.arange(blocks) * block
    block_expert = jnp.clip(jnp.searchsorted(jnp.cumsum(padded_e), block_start, side="right"), 0, num_experts - 1)
    return dest_a, block_expert, blocks * block


def blocks_matmul(block_expert, block: int):
    """A grouped matmul over rows laid out by `block_layout`: block j times its expert's weight."""
    return lambda x_rd, w_exy: _blocks_matmul(x_rd, w_exy, block_expert, block)


def _scan_blocks(x_rd, w_exy, block_expert, block: int, transpose: bool = False):
    """x's blocks times their experts' weights (transposed), one block per scan step. On XLA:CPU a scan of
    plain 2-D matmuls runs about twice as fast as one batched matmul over the gathered weights."""

    def one(_, xs):
        x_bx, expert = xs
        w_xy = jax.lax.dynamic_index_in_dim(w_exy, expert, keepdims=False)
        return None, x_bx @ (w_xy.T if transpose else w_xy)

    _, y_nby = jax.lax.scan(one, None, (x_rd.reshape(-1, block, x_rd.shape[-1]), block_expert))
    return y_nby.reshape(x_rd.shape[0], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocks_matmul(x_rd, w_exy, block_expert, block: int):
    return _scan_blocks(x_rd, w_exy, block_expert, block)


def _blocks_matmul_fwd(x_rd, w_exy, block_expert, block):
    return _scan_blocks(x_rd, w_exy, block_expert, block), (x_rd, w_exy, block_expert)


def _blocks_matmul_bwd(block, residuals, dy_ry):
    """dx by the same scan against the transposed weights; dw as one batched outer product per block,
    summed into each block's expert (the scan's own transpose would add into the whole (E, x, y) gradient
    at every step, which is slower)."""
    x_rd, w_exy, block_expert = residuals
    dx_rd = _scan_blocks(dy_ry, w_exy, block_expert, block, transpose=True)
    blocks = block_expert.shape[0]
    dw_nxy = jnp.einsum("nbx,nby->nxy", x_rd.reshape(blocks, block, -1), dy_ry.reshape(blocks, block, -1))
    dw_exy = jax.ops.segment_sum(dw_nxy, block_expert, num_segments=w_exy.shape[0], indices_are_sorted=True)
    return dx_rd, dw_exy.astype(w_exy.dtype), None


_blocks_matmul.defvjp(_blocks_matmul_fwd, _blocks_matmul_bwd)


def dropless(x_nd, experts_nk, weights_nk, gate, up, down, num_experts: int, impl: str):
    """Each token through its k experts, weighted and summed: (N, D). Exact, whatever the routing."""
    return combine(expert_outputs(x_nd, experts_nk, gate, up, down, num_experts, impl), weights_nk)


def expert_outputs(x_nd, experts_nk, gate, up, down, num_experts: int, impl: str):
    """(N, k, D): each token through each of its k experts, unweighted (expert parallelism weights them
    only after the rows have come back from the experts' devices)."""
    n, k = experts_nk.shape
    assignments = n * k
    order_a, sizes_e = sort_assignments(experts_nk, num_experts)
    token_a = order_a // k  # the token of each sorted assignment
    if impl == "ragged_dot":
        matmul = lambda x, w: jax.lax.ragged_dot(x, w, sizes_e)
        y_ad = swiglu_experts(jnp.take(x_nd, token_a, axis=0), gate, up, down, matmul)
    else:
        block = block_size(assignments, num_experts)
        dest_a, block_expert, rows = block_layout(sizes_e, assignments, block)
        source_r = jnp.full((rows,), n, jnp.int32).at[dest_a].set(token_a)  # n: a padding row (zeros)
        x_rd = jnp.take(jnp.concatenate([x_nd, jnp.zeros_like(x_nd[:1])]), source_r, axis=0)
        y_rd = swiglu_experts(x_rd, gate, up, down, blocks_matmul(block_expert, block))
        y_ad = jnp.take(y_rd, dest_a, axis=0)
    y_ad = jnp.zeros_like(y_ad).at[order_a].set(y_ad)  # back to token-major assignment order
    return y_ad.reshape(n, k, -1)


def combine(y_nkd, weights_nk):
    """The routing-weighted sum of each token's k expert outputs: (N, D)."""
    return jnp.sum(y_nkd * weights_nk[..., None].astype(y_nkd.dtype), axis=1)


# ---- capacity factor: one-hot dispatch and combine ---------------------------------------------------------

def capacity(tokens: int, c: ModelConfig) -> int:
    return max(1, math.ceil(c.capacity_factor * tokens * c.experts_per_token / c.num_experts))


def dispatch_masks(experts_nk, weights_nk, mask_n, num_experts: int, cap: int):
    """(dispatch (N, E, C) 0/1, combine (N, E, C) weights, kept (N, k) bool).

    Each expert takes assignments in priority order, every token's first choice before any second choice
    (GShard), tokens in order within a choice; those past the capacity are dropped. Padding tokens
    (mask 0) take no place."""
    onehot_kne = jax.nn.one_hot(experts_nk.T, num_experts, dtype=jnp.int32) * mask_n[None, :, None].astype(jnp.int32)
    position_kne = jnp.cumsum(onehot_kne.reshape(-1, num_experts), axis=0).reshape(onehot_kne.shape) - 1
    position_kn = jnp.sum(position_kne * onehot_kne, axis=-1)
    kept_kn = (jnp.sum(onehot_kne, axis=-1) > 0) & (position_kn < cap)
    slot_knc = jax.nn.one_hot(jnp.where(kept_kn, position_kn, cap), cap, dtype=jnp.float32)  # cap: no slot
    dispatch_knec = onehot_kne.astype(jnp.float32)[..., None] * slot_knc[:, :, None, :]
    combine = jnp.einsum("knec,nk->nec", dispatch_knec, weights_nk.astype(jnp.float32))
    return jnp.sum(dispatch_knec, axis=0), combine, kept_kn.T


def with_capacity(x_nd, experts_nk, weights_nk, mask_n, gate, up, down, c: ModelConfig):
    """(output (N, D), assignments dropped) with each expert's buffer holding `capacity` rows."""
    n, k = experts_nk.shape
    dispatch_nec, combine_nec, kept_nk = dispatch_masks(
        experts_nk, weights_nk, mask_n, c.num_experts, capacity(n, c))
    dt = x_nd.dtype
    x_ecd = jnp.einsum("nec,nd->ecd", dispatch_nec.astype(dt), x_nd)
    h_ecf = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ecd, gate)) * jnp.einsum("ecd,edf->ecf", x_ecd, up)
    y_ecd = jnp.einsum("ecf,efd->ecd", h_ecf, down)
    dropped = jnp.sum(mask_n.astype(jnp.float32)) * k - jnp.sum(kept_nk.astype(jnp.float32))
    return jnp.einsum("nec,ecd->nd", combine_nec.astype(dt), y_ecd), dropped


def resolve_matmul(impl: str, platform: str | None = None) -> str:
    """The grouped matmul `model.moe_matmul` names, "auto" chosen for `platform` (default: JAX's backend;
    an AOT compile for a TPU from a CPU host passes the target's)."""
    if impl != "auto":
        return impl
    return "blocks" if (platform or jax.default_backend()) == "cpu" else "ragged_dot"
