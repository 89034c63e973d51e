"""The mixture-of-experts feed-forward layer: a router picks k of E SwiGLU experts per token.

The router's softmax and top-k are here, with its losses; the experts' compute is in `jaxlm.model.experts`
(dropless grouped matmuls, or a capacity factor), and over a mesh with an `expert` axis in
`jaxlm.model.expert_parallel` (the experts' weights split over it, tokens sent to them and back).

Router statistics (the load-balancing and z losses, each expert's load, the dropped fraction) are sown into
the "intermediates" collection under "moe"; `collect_stats` gathers them for the objective.

Shape letters: N tokens, D model width, E experts, F expert MLP width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.core.config import ModelConfig
from jaxlm.core.sharding import constrain
from jaxlm.model import expert_parallel
from jaxlm.model.experts import EXPERT_WEIGHTS, dropless, resolve_matmul, with_capacity
from jaxlm.model.layers import MLP, LowRank, compute_dtype, dense, weight

def route(logits_ne: jax.Array, c: ModelConfig):
    """(weights (N, k) float32, experts (N, k) int32, probabilities (N, E) float32) for router logits."""
    logits_ne = logits_ne.astype(jnp.float32)
    probs_ne = jax.nn.softmax(logits_ne, axis=-1)
    if c.router == "topk_softmax":
        top_nk, experts_nk = jax.lax.top_k(logits_ne, c.experts_per_token)
        return jax.nn.softmax(top_nk, axis=-1), experts_nk, probs_ne
    weights_nk, experts_nk = jax.lax.top_k(probs_ne, c.experts_per_token)
    if c.norm_topk_prob:
        weights_nk = weights_nk / jnp.sum(weights_nk, axis=-1, keepdims=True)
    return weights_nk, experts_nk, probs_ne


def router_losses(logits_ne, probs_ne, experts_nk, mask_n, num_experts: int):
    """(load-balancing loss, z-loss, per-expert load fractions (E,)) over the tokens `mask_n` marks.

    Balance: E * sum_e f_e * P_e, where f_e is the fraction of tokens routed to expert e (over all k
    choices, so the f_e sum to k, as Hugging Face's Mixtral computes it) and P_e the mean router probability
    of e; 1 * k when perfectly balanced. z-loss: the mean of logsumexp(logits)^2 (ST-MoE)."""
    mask_n = mask_n.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask_n), 1.0)
    counts_e = jnp.sum(jax.nn.one_hot(experts_nk, num_experts, dtype=jnp.float32) * mask_n[:, None, None], axis=(0, 1))
    f_e = counts_e / tokens
    p_e = jnp.sum(probs_ne * mask_n[:, None], axis=0) / tokens
    balance = num_experts * jnp.sum(f_e * p_e)
    z = jnp.sum(jnp.square(jax.nn.logsumexp(logits_ne.astype(jnp.float32), axis=-1)) * mask_n) / tokens
    return balance, z, counts_e / jnp.maximum(jnp.sum(counts_e), 1.0)


def expert_weights(module: nn.Module, c: ModelConfig, dt):
    """The experts' stacked SwiGLU weights, in the compute dtype (LoRA adapters merged into them)."""
    dims = {"D": c.d_model, "F": c.resolved_expert_mlp_dim}
    out = []
    for name, (names, axes) in EXPERT_WEIGHTS.items():
        w = weight(module, name, (c.num_experts, *(dims[a] for a in axes)), names, c)
        if isinstance(w, LowRank):  # batched over experts: a (E, in, r), b (E, r, out)
            # Merged, not applied on the activations as `dense` does: the grouped matmuls (and expert
            # parallelism's shard_map) take whole weights. The merge costs E*in*out*r FLOPs, whatever the tokens.
            w = w.w.astype(dt) + jnp.einsum("exr,ery->exy", w.a.astype(dt), w.b.astype(dt))
        out.append(w.astype(dt))
    return out


class MoE(nn.Module):
    """Routed SwiGLU experts, plus an optional shared expert (Qwen2-MoE, optionally sigmoid-gated)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd, segment_ids_bt, decoding: bool = False):
        c = self.config
        dt = compute_dtype(c)
        b, t, d = x_btd.shape
        x_nd = x_btd.astype(dt).reshape(b * t, d)
        mask_n = (segment_ids_bt > 0).reshape(-1)
        router_de = weight(self, "router", (d, c.num_experts), ("embed", None), c)
        logits_ne = dense(x_nd.astype(jnp.float32), router_de.astype(jnp.float32))
        weights_nk, experts_nk, probs_ne = route(logits_ne, c)
        gate, up, down = expert_weights(self, c, dt)
        dropped = jnp.zeros((), jnp.float32)
        if c.capacity_factor and not decoding:
            y_nd, dropped = with_capacity(x_nd, experts_nk, weights_nk, mask_n, gate, up, down, c)
        elif expert_parallel.active():
            y_nd = expert_parallel.dropless(x_nd, experts_nk, weights_nk, gate, up, down, c)
        else:
            y_nd = dropless(x_nd, experts_nk, weights_nk, gate, up, down, c.num_experts, resolve_matmul(c.moe_matmul))
        y_btd = y_nd.reshape(b, t, d)
        if c.shared_expert_dim:
            y_btd = y_btd + self.shared(x_btd.astype(dt))
        if not decoding:
            balance, z, load_e = router_losses(logits_ne, probs_ne, experts_nk, mask_n, c.num_experts)
            assignments = jnp.maximum(jnp.sum(mask_n.astype(jnp.float32)) * c.experts_per_token, 1.0)
            self.sow("intermediates", "moe", {
                "loss": c.router_aux_loss * balance + c.router_z_loss * z, "balance": balance, "z": z,
                "load": load_e, "dropped": dropped / assignments})
        return constrain(y_btd, ("activation_batch", "activation_length", "activation_embed"))

    def shared(self, x_btd):
        c = self.config
        y_btd = MLP(c, mlp_dim=c.shared_expert_dim, name="shared")(x_btd)
        if c.shared_expert_gate:
            gate_d1 = weight(self, "shared_gate", (c.d_model, 1), ("embed", None), c)
            y_btd = y_btd * jax.nn.sigmoid(dense(x_btd, gate_d1.astype(x_btd.dtype)))
        return y_btd


def collect_stats(intermediates) -> dict | None:
    """The sown router statistics of every MoE layer, stacked: {"loss", "balance", "z", "dropped"}: (L_moe,),
    "load": (L_moe, E); None for a dense model."""
    found = []

    def visit(tree):
        if not isinstance(tree, dict):
            return
        for key in sorted(tree, key=_layer_order):
            if key == "moe" and isinstance(tree[key], tuple):
                found.extend(tree[key])
            else:
                visit(tree[key])

    visit(intermediates)
    if not found:
        return None
    # A scanned stack sows once with a leading layer axis; an unrolled layer sows its own.
    flat = lambda k, v: jnp.reshape(v, (-1, v.shape[-1]) if k == "load" else (-1,))
    return {k: jnp.concatenate([flat(k, s[k]) for s in found]) for k in found[0]}


def _layer_order(key: str):
    """layers_10 after layers_9."""
    head, _, index = key.rpartition("_")
    return (head, int(index)) if index.isdigit() else (key, -1)
