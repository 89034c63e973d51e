"""Where a mixture-of-experts layer's time goes: routing and data movement vs the expert matmuls.

    python bench/moe_layer.py                      # moe_tiny's layer shape at its training batch
    python bench/moe_layer.py --tokens 8192 --experts 8 --k 2 --d 256 --f 384

Times forward + backward (jitted, median of windows) of:
- the whole dropless layer (`jaxlm.model.grouped.dropless`) with each grouped matmul (blocks, ragged_dot),
- the expert matmuls alone, on rows already laid out in blocks (the same three grouped matmuls),
- routing alone (router matmul, softmax, top-k, load-balancing and z losses),
- the capacity-factor layer at factor 1.25,
- a dense SwiGLU MLP with the same active parameters (width k*F) on the same tokens.
The difference between the whole layer and its matmuls is the sort, the gathers into blocks and back,
and the weighting: the routing/sort overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time


def timed(fn, *args, windows: int = 5, reps: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per layer call (batch x length)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2, help="experts per token")
    parser.add_argument("--d", type=int, default=256, help="model width")
    parser.add_argument("--f", type=int, default=384, help="expert MLP width")
    parser.add_argument("--windows", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlm.core.config import ModelConfig
    from jaxlm.model import experts as grouped, moe

    n, e, k, d, f = args.tokens, args.experts, args.k, args.d, args.f
    rng = np.random.default_rng(0)
    w = lambda *s: jnp.asarray(rng.normal(0, 0.05, s), jnp.float32)
    x, router = w(n, d), w(d, e)
    gate, up, down = w(e, d, f), w(e, d, f), w(e, f, d)
    c = ModelConfig(num_experts=e, experts_per_token=k, capacity_factor=1.25)
    weights, experts, _ = moe.route(x @ router, c)
    mask = jnp.ones((n,), bool)

    def fwd_bwd(layer):
        loss = lambda *a: jnp.sum(layer(*a) ** 2)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    def routing(x, router, *_):
        logits = x @ router
        wts, ex, probs = moe.route(logits, c)
        balance, z, _ = moe.router_losses(logits, probs, ex, mask, e)
        return jnp.sum(wts) + balance + z

    order, sizes = grouped.sort_assignments(experts, e)
    block = grouped.block_size(n * k, e)
    dest, block_expert, rows = grouped.block_layout(sizes, n * k, block)
    x_rows = jnp.take(x, jnp.full((rows,), 0).at[dest].set(order // k), axis=0)
    dense_gate, dense_up, dense_down = w(d, k * f), w(d, k * f), w(k * f, d)
    results = {
        "dropless, blocks": timed(fwd_bwd(lambda x, g, u, dn: grouped.dropless(x, experts, weights, g, u, dn, e, "blocks")),
                                  x, gate, up, down, windows=args.windows),
        "  expert matmuls alone (blocks)": timed(fwd_bwd(lambda x, g, u, dn: grouped.swiglu_experts(
            x, g, u, dn, grouped.blocks_matmul(block_expert, block))), x_rows, gate, up, down, windows=args.windows),
        "dropless, ragged_dot": timed(fwd_bwd(lambda x, g, u, dn: grouped.dropless(
            x, experts, weights, g, u, dn, e, "ragged_dot")), x, gate, up, down, windows=args.windows),
        "capacity factor 1.25": timed(fwd_bwd(lambda x, g, u, dn: grouped.with_capacity(
            x, experts, weights, mask, g, u, dn, c)[0]), x, gate, up, down, windows=args.windows),
        "routing (router, top-k, losses)": timed(jax.jit(jax.value_and_grad(routing, argnums=(0, 1))), x, router,
                                                 windows=args.windows),
        f"dense SwiGLU, width k*F={k * f}": timed(fwd_bwd(lambda x, g, u, dn: jax.nn.silu(x @ g) * (x @ u) @ dn),
                                                 x, dense_gate, dense_up, dense_down, windows=args.windows),
    }
    base = results[f"dense SwiGLU, width k*F={k * f}"]
    print(f"tokens {n}, experts {e}, k {k}, d {d}, expert width {f}, block {block} rows; forward + backward, "
          f"{jax.default_backend()}")
    print(f"{'':<36} {'ms':>8} {'vs dense':>9}")
    for name, s in results.items():
        print(f"{name:<36} {s * 1e3:>8.2f} {s / base:>8.2f}x")
    overhead = results["dropless, blocks"] - results["  expert matmuls alone (blocks)"]
    print(f"sort/gather/scatter overhead of the blocks layer: {overhead * 1e3:.2f} ms "
          f"({overhead / results['dropless, blocks']:.0%} of the layer)")


if __name__ == "__main__":
    main()
