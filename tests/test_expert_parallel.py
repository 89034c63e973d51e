"""Expert parallelism over the `expert` mesh axis: the same outputs and gradients as one device's dropless MoE,
alone and with data, fsdp, sequence and tensor axes, for even and skewed routing, and through the whole model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import quick_jit, small_config

from jaxlm.core import mesh as mesh_lib
from jaxlm.core.config import MeshConfig, ModelConfig
from jaxlm.core.sharded_init import boxed_params
from jaxlm.core.sharding import tree_shardings
from jaxlm.model import expert_parallel, experts as grouped, moe
from jaxlm.model.transformer import Transformer

N, D, E, K, F = 192, 32, 8, 2, 24
CONFIG = ModelConfig(d_model=D, num_experts=E, experts_per_token=K, expert_mlp_dim=F, dtype="float32")


def mesh(**axes):
    sizes = {"fsdp": 1, **axes}
    return mesh_lib.make_mesh(MeshConfig(**sizes), jax.devices()[: int(np.prod(list(sizes.values())))])


@functools.lru_cache
def inputs(skew: bool, n: int = N):
    """(x, routing weights, gate, up, down), the chosen experts, and an output cotangent. Skewed: every
    token picks experts 0 and 1, which live on one device whatever the expert axis (E/ep >= 2 for ep <= 4;
    at ep=8 they are two devices' only experts), so one device receives every assignment."""
    rng = np.random.default_rng(n + skew)
    logits = rng.normal(size=(n, E)) + (np.array([9.0, 8.0] + [0.0] * (E - 2)) if skew else 0.0)
    weights, experts, _ = moe.route(jnp.asarray(logits, jnp.float32), CONFIG)
    w = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
    args = (w(n, D) / 0.3, weights, w(E, D, F), w(E, D, F), w(E, F, D))
    return args, experts, w(n, D)


def out_and_grads(layer, experts, cotangent):
    """layer's output and its gradients w.r.t. x, the routing weights and the three expert weights."""
    def run(x, weights, gate, up, down):
        y, vjp = jax.vjp(lambda x, w, g, u, d: layer(x, experts, w, g, u, d), x, weights, gate, up, down)
        return y, vjp(cotangent)
    return run


@functools.lru_cache
def reference(skew: bool, n: int = N):
    args, experts, cot = inputs(skew, n)
    run = out_and_grads(lambda *a: grouped.dropless(*a, E, "blocks"), experts, cot)
    return quick_jit(run, *args)(*args)


def assert_close(got, want):
    for name, g, r in zip(("out", "x", "weights", "gate", "up", "down"), jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(r))), err_msg=name)


def run_sharded(axes: dict, skew: bool, n: int = N):
    args, experts, cot = inputs(skew, n)
    run = out_and_grads(lambda *a: expert_parallel.dropless(*a, CONFIG), experts, cot)
    with jax.set_mesh(mesh(**axes)):
        assert expert_parallel.active()
        compiled = quick_jit(run, *args)
    # The tokens travel to the expert devices; without an expert axis, nothing is exchanged.
    assert ("all-to-all" in compiled.as_text()) == (axes.get("expert", 1) > 1)
    return compiled(*args)


DEFAULT = [(dict(expert=4), True), (dict(expert=2, fsdp=2, tensor=2), False)]
GRID = [dict(expert=2), dict(expert=4), dict(expert=8), dict(expert=4, fsdp=2), dict(expert=2, fsdp=4), dict(fsdp=4, tensor=2),
        dict(expert=4, tensor=2), dict(expert=2, tensor=4), dict(expert=4, data=2), dict(expert=2, fsdp=2, sequence=2),
        dict(expert=2, data=2, sequence=2)]
# Each case compiles for 2-5 s on 2 cores: the default pass runs the two above (skewed routing on 4 expert
# devices; experts with fsdp and tensor); the slow pass runs the whole grid (2/4/8 expert devices, with
# fsdp, tensor, data, sequence, and a mesh without an expert axis) with both routings.
CASES = [pytest.param(axes, skew, id="-".join(f"{a}{n}" for a, n in axes.items()) + skew * "-skewed",
                      marks=() if (axes, skew) in DEFAULT else pytest.mark.slow)
         for axes in GRID + [a for a, _ in DEFAULT if a not in GRID] for skew in (False, True)]


@pytest.mark.parametrize("axes,skew", CASES)
def test_expert_parallel_equals_one_device(axes, skew):
    assert_close(run_sharded(axes, skew), reference(skew))


def test_tokens_that_do_not_split_over_the_expert_axis():
    """6 tokens (a decoding step's few rows) cannot split over expert=4: every expert device then routes the
    same tokens, and the result is still one device's."""
    assert_close(run_sharded(dict(expert=4), False, n=6), reference(False, n=6))


def test_send_layout_puts_each_device_rows_in_its_slot():
    experts = jnp.asarray([[3, 0], [1, 2], [0, 3]], jnp.int32)  # 4 experts on 2 devices: {0, 1}, {2, 3}
    source, expert, row = jax.jit(expert_parallel.send_layout, static_argnums=(1, 2))(experts, 4, 2)
    # Slot 0 (rows 0-5): device 0's assignments sorted by expert: tokens 0, 2 (expert 0), 1 (expert 1).
    # Slot 1 (rows 6-11): tokens 1 (expert 2), 0, 2 (expert 3). Empty rows read token 3, the zero row.
    np.testing.assert_array_equal(source, [0, 2, 1, 3, 3, 3, 1, 0, 2, 3, 3, 3])
    np.testing.assert_array_equal(expert, [0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(row, [7, 0, 2, 6, 1, 8])  # token-major: (0, e3), (0, e0), (1, e1), ...


def test_active_on_any_mesh_of_several_devices():
    """Without an expert axis the layer still runs per device (FSDP and data parallelism alike), so that
    each device sorts and multiplies only its own tokens' assignments."""
    assert not expert_parallel.active()
    with jax.set_mesh(mesh(fsdp=1)):
        assert not expert_parallel.active()
    with jax.set_mesh(mesh(fsdp=2)):
        assert expert_parallel.active()


# ---- the whole model ---------------------------------------------------------------------------------------

B, T = 8, 16


def model_loss(model):
    """(loss, router stats) for a fixed batch: next-token cross-entropy plus the router losses."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 128, (B, T)), jnp.int32)
    seg = jnp.asarray(np.where(np.arange(T) < 11, 1, 2) * np.ones((B, 1), int), jnp.int32)  # 2 documents a row
    pos = jnp.asarray(np.where(np.arange(T) < 11, np.arange(T), np.arange(T) - 11) * np.ones((B, 1), int))

    def loss(params):
        logits, state = model.apply({"params": params}, tokens, pos, seg, mutable=["intermediates"])
        stats = moe.collect_stats(state["intermediates"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1)
        return jnp.mean(nll) + jnp.sum(stats["loss"]), stats

    return jax.value_and_grad(loss, has_aux=True)


@functools.lru_cache
def model_and_params():
    config = small_config(num_experts=E, experts_per_token=K, expert_mlp_dim=F, num_layers=2, router_z_loss=1e-3).model
    model = Transformer(config, "xla")
    init = lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    params = quick_jit(init, jax.random.key(0))(jax.random.key(0))
    f = model_loss(model)
    return model, params, quick_jit(f, params)(params)


@pytest.mark.parametrize("axes", [dict(expert=4), pytest.param(dict(expert=2, fsdp=2, tensor=2), marks=pytest.mark.slow)],
                         ids=["expert4", "expert2-fsdp2-tensor2"])  # the layer itself is checked on that mesh by default
def test_transformer_with_expert_parallelism_equals_one_device(axes):
    """Loss, gradients of every parameter and the router statistics (losses, per-expert load) of a 2-layer
    MoE model with its params sharded as jaxlm shards them (experts over `expert`, embed over fsdp, mlp
    over tensor) equal one device's."""
    model, params, ((want_loss, want_stats), want_grads) = model_and_params()
    m = mesh(**axes)
    shardings = tree_shardings(boxed_params(model), m)
    assert shardings["layers"]["moe"]["gate"].spec[1] == "expert"  # (layers, expert, embed, mlp)
    sharded = jax.device_put(params, shardings)
    f = model_loss(model)
    with jax.set_mesh(m):
        compiled = quick_jit(f, sharded)
    assert "all-to-all" in compiled.as_text()
    (loss, stats), grads = compiled(sharded)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, want_stats)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b)))),
                 grads, want_grads)
