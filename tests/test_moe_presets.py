"""The mixture-of-experts presets: total and active parameter counts of the full-size shapes through
`jax.eval_shape` alone (nothing allocated), MFU's active-parameter FLOPs, and the CPU quickstart's match
with `tiny`."""

import jax
import pytest

from jaxlm.core import flops, overrides
from jaxlm.core.sharded_init import abstract_params
from jaxlm.core.sharding import path_str
from jaxlm.model.transformer import Transformer, count_params

ROUTED = ("moe/gate", "moe/up", "moe/down")  # the routed experts' stacked weights; moe/shared/* is always on


def counts(config):
    """(total, active) from the abstract parameters: a routed expert weight (leading axis E after any layer
    axis) counts k/E of its size as active, everything else (router and shared expert included) all of it."""
    c = config.model
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(Transformer(c)))[0]
    total = active = 0
    for path, leaf in leaves:
        size = int(leaf.size)
        total += size
        if path_str(path).endswith(ROUTED):
            assert c.num_experts in leaf.shape[:2]
            size = size * c.experts_per_token // c.num_experts
        active += size
    return total, active


@pytest.mark.parametrize("preset, total, active", [
    ("mixtral_8x7b", 46_702_792_704, 12_879_925_248),  # published for Mixtral-8x7B-v0.1: both exact
    ("qwen3_30b_a3b", 30_532_122_624, 3_353_032_704),  # published: 30.5B total, 3.3B active
])
def test_moe_presets_total_and_active_params_through_eval_shape(preset, total, active):
    config = overrides.load([preset])
    assert counts(config) == (total, active)
    assert count_params(abstract_params(Transformer(config.model))) == total
    assert flops.active_params(config.model, total) == active


def test_moe_presets_shard_experts_over_the_expert_axis():
    from jaxlm.core.sharding import tree_shardings
    from jaxlm.planning.memory import abstract_mesh

    config = overrides.load(["mixtral_8x7b"])
    model = Transformer(config.model)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32)))["params"]
    sizes = {"stage": 1, "data": 1, "fsdp": 4, "sequence": 1, "expert": 8, "tensor": 2}
    shardings = tree_shardings(boxed, abstract_mesh(sizes))
    P = jax.sharding.PartitionSpec
    assert shardings["layers"]["moe"]["gate"].spec == P(None, "expert", "fsdp", "tensor")  # (L, E, D, F)
    assert shardings["layers"]["moe"]["down"].spec == P(None, "expert", "tensor", "fsdp")
    assert shardings["layers"]["moe"]["router"].spec == P(None, "fsdp", None)


def test_mfu_flops_count_active_experts_only():
    """moe_tiny's two 384-wide experts per token are tiny's 768-wide MLP: the same matmul parameters per
    token, plus the router; the 6 experts a token is not sent to add nothing."""
    tiny, moe_tiny = overrides.load(["tiny"]).model, overrides.load(["moe_tiny"]).model
    assert moe_tiny.experts_per_token * moe_tiny.resolved_expert_mlp_dim == tiny.mlp_dim
    router = moe_tiny.num_layers * moe_tiny.d_model * moe_tiny.num_experts
    assert flops.matmul_params(moe_tiny) == flops.matmul_params(tiny) + router
    assert flops.flops_per_token(moe_tiny, 256) == flops.flops_per_token(tiny, 256) + 6 * router
    # Mixtral: attention + router + 2 of 8 experts per layer, plus the output projection.
    mixtral = overrides.load(["mixtral_8x7b"]).model
    per_layer = 4096 * 128 * (2 * 32 + 2 * 8) + 4096 * 8 + 2 * 3 * 4096 * 14336
    assert flops.matmul_params(mixtral) == 32 * per_layer + 4096 * 32000 == 12_748_587_008
    # A shared expert (with its sigmoid gate) is always on, and only every other layer is MoE here.
    mixed = overrides.load(["moe_tiny", "model.shared_expert_dim=128", "model.shared_expert_gate=True",
                            "model.moe_every=2", "model.scan_layers=False"]).model
    moe_ffn = 2 * 3 * 256 * 384 + 3 * 256 * 128 + 256 + 256 * 8
    assert flops.moe_layer_count(mixed) == 2
    assert flops.matmul_params(mixed) == flops.matmul_params(tiny) + 2 * (moe_ffn - 3 * 256 * 768)


def test_moe_tiny_is_tiny_with_experts():
    tiny, moe_tiny = overrides.load(["tiny"]), overrides.load(["moe_tiny"])
    assert (moe_tiny.model.num_experts, moe_tiny.model.experts_per_token, moe_tiny.model.expert_mlp_dim) == (8, 2, 384)
    assert (moe_tiny.train, moe_tiny.optim, moe_tiny.data) == (tiny.train, tiny.optim, tiny.data)
    total, active = counts(moe_tiny)
    assert active == count_params(abstract_params(Transformer(tiny.model))) + 4 * 256 * 8  # plus the routers
    assert total == active + 4 * 6 * 3 * 256 * 384
