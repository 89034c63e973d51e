"""The mixture-of-experts layer against per-token references: dropless and capacity compute, routing, and
the router losses on crafted logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import replace, small_config

from jaxlm.core.config import ConfigError, ModelConfig, validate
from jaxlm.model import experts as grouped, moe
from jaxlm.model.transformer import Transformer

E, K, D, F = 6, 2, 16, 12


def expert_weights(seed=0):
    rng = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
    return w(E, D, F), w(E, D, F), w(E, F, D)


def reference(x_nd, experts_nk, weights_nk, gate, up, down, kept_nk=None):
    """Each token through its k experts one at a time, weighted and summed (dropped ones skipped); mapped
    over the tokens with vmap so that it compiles once."""
    kept_nk = jnp.ones(experts_nk.shape, bool) if kept_nk is None else jnp.asarray(kept_nk)

    def one_token(x_d, experts_k, weights_k, kept_k):
        y = jnp.zeros((D,), jnp.float32)
        for j in range(experts_k.shape[0]):
            e = experts_k[j]
            h = jax.nn.silu(x_d @ gate[e]) * (x_d @ up[e])
            y = y + jnp.where(kept_k[j], weights_k[j], 0.0) * (h @ down[e])
        return y

    return jax.vmap(one_token)(x_nd, experts_nk, weights_nk, kept_nk)


def routing(n, seed=1, skew=False):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
    logits = rng.normal(size=(n, E)) + (np.array([4.0] + [0.0] * (E - 1)) if skew else 0.0)
    c = ModelConfig(num_experts=E, experts_per_token=K)
    weights, experts, _ = moe.route(jnp.asarray(logits, jnp.float32), c)
    return x, experts, weights


@pytest.mark.parametrize("impl", ["blocks", "ragged_dot"])
@pytest.mark.parametrize("skew", [False, True])
def test_dropless_equals_the_per_token_loop_forward_and_gradients(impl, skew):
    """Whatever the routing (an even spread, or most tokens on one expert), every token reaches its k
    experts: output and gradients (input, routing weights, every expert weight) equal the reference loop."""
    x, experts, weights = routing(37, skew=skew)  # odd token count: blocks are padded
    gate, up, down = expert_weights()
    layer = lambda x, w, g, u, d: grouped.dropless(x, experts, w, g, u, d, E, impl)
    ref = lambda x, w, g, u, d: reference(x, experts, w, g, u, d)
    args = (x, weights, gate, up, down)
    np.testing.assert_allclose(jax.jit(layer)(*args), jax.jit(ref)(*args), rtol=1e-5, atol=1e-6)
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=(37, D)), jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cotangent)
    grads = jax.jit(jax.grad(loss(layer), argnums=range(5)))(*args)
    expected = jax.jit(jax.grad(loss(ref), argnums=range(5)))(*args)
    for g, r in zip(grads, expected):  # float32 sums over up to 37 tokens, in another order
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(r))))


def test_block_layout_puts_each_expert_on_its_own_blocks():
    sizes = jnp.asarray([5, 0, 9, 1], jnp.int32)
    dest, block_expert, rows = grouped.block_layout(sizes, 15, 4)
    assert rows == (4 + 4) * 4  # ceil(15/4) + E blocks
    # expert 0: rows 0-4 (blocks 0-1), expert 2: rows 8-16 (blocks 2-4), expert 3: row 20 (block 5)
    np.testing.assert_array_equal(dest, [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20])
    np.testing.assert_array_equal(block_expert[:6], [0, 0, 2, 2, 2, 3])


def test_capacity_path_equals_the_reference_when_capacity_suffices():
    x, experts, weights = routing(24)
    gate, up, down = expert_weights()
    c = ModelConfig(num_experts=E, experts_per_token=K, capacity_factor=float(E))  # room for every token
    y, dropped = grouped.with_capacity(x, experts, weights, jnp.ones(24, bool), gate, up, down, c)
    assert float(dropped) == 0
    np.testing.assert_allclose(y, reference(x, experts, weights, gate, up, down), rtol=1e-5, atol=1e-6)


def test_capacity_path_drops_exactly_the_assignments_it_reports():
    """Skewed routing overflows expert 0: the output equals the reference without exactly the assignments
    past each expert's capacity in priority order (all first choices, then second choices, token order)."""
    n = 30
    x, experts, weights = routing(n, skew=True)
    gate, up, down = expert_weights()
    c = ModelConfig(num_experts=E, experts_per_token=K, capacity_factor=1.0)
    cap = grouped.capacity(n, c)
    mask = jnp.asarray(np.arange(n) < 27)  # three padding tokens take no place
    y, dropped = grouped.with_capacity(x, experts, weights, mask, gate, up, down, c)
    ex = np.asarray(experts)
    kept = np.zeros_like(ex, bool)
    filled = np.zeros(E, int)
    for j in range(K):
        for t in range(27):
            if filled[ex[t, j]] < cap:
                kept[t, j] = True
                filled[ex[t, j]] += 1
    assert float(dropped) == 27 * K - kept.sum() > 0
    expected = reference(x, experts, weights, gate, up, down, kept)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_routing_modes():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    probs = jax.nn.softmax(logits[0])
    c = ModelConfig(num_experts=4, experts_per_token=2, norm_topk_prob=False)
    w, e, p = moe.route(logits, c)
    np.testing.assert_array_equal(e, [[0, 1]])
    np.testing.assert_allclose(w, [probs[:2]], rtol=1e-6)
    np.testing.assert_allclose(p, [probs], rtol=1e-6)
    w, _, _ = moe.route(logits, dataclasses.replace(c, norm_topk_prob=True))
    np.testing.assert_allclose(w, [probs[:2] / probs[:2].sum()], rtol=1e-6)
    w, _, _ = moe.route(logits, dataclasses.replace(c, router="topk_softmax"))
    np.testing.assert_allclose(w, [jax.nn.softmax(jnp.asarray([2.0, 1.0]))], rtol=1e-6)


def test_router_losses_equal_their_formulas_on_crafted_logits():
    # 4 tokens, 4 experts, k=1; the fourth token is padding and counts nowhere.
    logits = jnp.asarray([[3.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 9.0, 0, 0]])
    c = ModelConfig(num_experts=4, experts_per_token=1)
    _, experts, probs = moe.route(logits, c)
    mask = jnp.asarray([1, 1, 1, 0])
    balance, z, load = moe.router_losses(logits, probs, experts, mask, 4)
    big, small = np.exp(3) / (np.exp(3) + 3), 1 / (np.exp(3) + 3)
    f = np.array([2, 0, 1, 0]) / 3  # tokens per expert over the 3 real tokens
    p = np.array([2 * big + small, 3 * small, big + 2 * small, 3 * small]) / 3
    np.testing.assert_allclose(balance, 4 * np.sum(f * p), rtol=1e-6)
    np.testing.assert_allclose(z, np.log(np.exp(3) + 3) ** 2, rtol=1e-6)
    np.testing.assert_allclose(load, f, rtol=1e-6)
    # A perfectly even router scores k (here 1), the minimum.
    even, _, _ = moe.router_losses(jnp.zeros((4, 4)), jnp.full((4, 4), 0.25), jnp.asarray([[0], [1], [2], [3]]),
                                   jnp.ones(4), 4)
    np.testing.assert_allclose(even, 1.0, rtol=1e-6)


def moe_config(**model):
    return small_config(**{"num_experts": 4, "experts_per_token": 2, "expert_mlp_dim": 24, **model})


def test_objective_adds_the_weighted_router_losses_and_logs_per_layer_load():
    from jaxlm.training.objectives import next_token

    config = moe_config(router_aux_loss=0.1, router_z_loss=0.01)
    model = Transformer(config.model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)))
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    batch = {"inputs": tokens, "targets": tokens, "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
             "segment_ids": jnp.ones_like(tokens), "loss_mask": jnp.ones_like(tokens)}
    value, metrics = jax.jit(next_token(model.apply).loss)(params, batch, None)
    stats = jax.jit(lambda p: moe.collect_stats(model.apply({"params": p}, tokens, mutable=["intermediates"])[1]["intermediates"]))(params)
    assert stats["load"].shape == (2, 4)
    penalty = np.mean(0.1 * stats["balance"] + 0.01 * stats["z"])
    np.testing.assert_allclose(value, metrics["loss"] + 32 * penalty, rtol=1e-5)
    np.testing.assert_allclose(metrics["moe/load_max/moe_layer1"] / 32, 4 * np.max(stats["load"][1]), rtol=1e-6)
    assert float(metrics["moe/dropped"]) == 0


def test_mixed_dense_and_moe_layers_unrolled():
    config = moe_config(num_layers=4, moe_every=2, scan_layers=False, shared_expert_dim=8,
                        shared_expert_gate=True)
    assert [config.model.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    model = Transformer(config.model)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    assert "mlp" in params["layers_0"] and "moe" in params["layers_1"] and "mlp" in params["layers_2"]
    assert params["layers_3"]["moe"]["gate"].value.shape == (4, 32, 24)
    assert params["layers_1"]["moe"]["shared_gate"].value.shape == (32, 1)


@pytest.mark.parametrize("model, mesh, message", [
    (dict(experts_per_token=5), {}, "model.experts_per_token=5 exceeds model.num_experts=4"),
    (dict(moe_every=2), {}, "set model.scan_layers=false"),
    (dict(moe_first_layer=2), {}, "leaves no MoE layer"),
    ({}, dict(expert=3), "mesh.expert=3"),
    (dict(shared_expert_gate=True), {}, "model.shared_expert_dim"),
])
def test_bad_moe_settings_are_one_line(model, mesh, message):
    config = replace(moe_config(**model), mesh=mesh)
    with pytest.raises(ConfigError, match=message) as e:
        validate(config)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # three `jaxlm train` processes (~2 min); the MoE objective and layers are checked by default above
def test_moe_run_resumes_bit_identically_with_experts_sharded(tmp_path):
    """An MoE run with its experts split over mesh.expert=2 (and fsdp=4): 6 steps in one go equal 3 steps,
    process exit, then 3 more; losses, router metrics and parameters bit for bit."""
    from test_train import SMALL, jaxlm_train, losses, saved_state
    import json

    cache = str(tmp_path / "cache")
    args = SMALL + ["train.steps=6", "checkpoint.every=100", "model.num_experts=4", "model.experts_per_token=2",
                    "model.expert_mlp_dim=64", "model.router_z_loss=0.001", "mesh.expert=2", "mesh.fsdp=4"]
    whole = jaxlm_train(args, tmp_path / "whole", cache)
    assert whole.returncode == 0, whole.stderr
    first = jaxlm_train(args + ["train.stop_at=3"], tmp_path / "split", cache)
    assert first.returncode == 0, first.stderr
    second = jaxlm_train(args, tmp_path / "split", cache)
    assert second.returncode == 0, second.stderr
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    rows = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    assert any("train/moe/load_max/moe_layer1" in r for r in rows)
    a, b = saved_state(tmp_path / "whole", 6), saved_state(tmp_path / "split", 6)
    jax.tree.map(np.testing.assert_array_equal, a, b)
