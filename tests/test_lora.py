"""LoRA through parameter masks: zero-B equals the base, only adapters train, merging, sharding, save/load."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import quick_jit, small_config

from jaxlm.core import sharded_init
from jaxlm.core.config import ConfigError, LoraConfig, MeshConfig
from jaxlm.core.mesh import make_mesh
from jaxlm.core.sharding import global_batch
from jaxlm.model import lora as lora_lib
from jaxlm.model.quantize import NF4_LEVELS
from jaxlm.model.transformer import Transformer
from jaxlm.training import base, optim
from jaxlm.training.objectives import next_token
from jaxlm.training.step import make_step

TARGETS = ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, t = config.train.batch_size, config.train.seq_len
    tokens = rng.integers(0, config.model.vocab_size, size=(b, t + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.int32)}


def _setup(config, lora_config=LoraConfig(targets=TARGETS, rank=4)):
    model = Transformer(config.model)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    lo = lora_lib.Lora(model, lora_config, boxed)
    abstract = lo.abstract_params()
    tx = optim.build_optimizer(config.optim, config.train.steps, abstract, trainable=lo.trainable)
    return model, lo, tx


def _random_b(adapters, seed=1):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


@pytest.mark.slow  # both variants (~36 s); LoRA logits against peft's are checked by default in test_peft.py
@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_zero_b_equals_base_and_merge_equals_base_plus_adapter(scan):
    config = small_config(scan_layers=scan)
    model, lo, _ = _setup(config)
    params = sharded_init.strip_boxes(jax.jit(lo.make_params_fn(0))())
    batch = _batch(config)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    apply, lora_apply = jax.jit(model.apply), jax.jit(lo.apply)
    base_logits = apply({"params": params["base"]}, *args)
    np.testing.assert_array_equal(lora_apply({"params": params}, *args), base_logits)  # B = 0: exactly the base

    adapters = _random_b(params["lora"])
    merged = jax.jit(lo.merge)(params["base"], adapters)
    scale = lo.config.alpha / lo.config.rank
    # Reference: each target's delta written out as an einsum over its own axes (o contracts two input axes).
    specs = {"attn/q": "dr,rnh->dnh", "attn/k": "dr,rkh->dkh", "attn/v": "dr,rkh->dkh", "attn/o": "nhr,rd->nhd",
             "mlp/gate": "dr,rf->df", "mlp/up": "dr,rf->df", "mlp/down": "fr,rd->fd"}
    for layer_key in (["layers"] if scan else [f"layers_{i}" for i in range(config.model.num_layers)]):
        for name, spec in specs.items():
            group, w = name.split("/")
            a, b = adapters[layer_key][group][w]["a"], adapters[layer_key][group][w]["b"]
            if scan:
                ins, outs = spec.split("->")
                x, y = ins.split(",")
                spec = f"l{x},l{y}->l{outs}"
            want = params["base"][layer_key][group][w] + scale * jnp.einsum(spec, a, b)
            np.testing.assert_allclose(merged[layer_key][group][w], want, rtol=1e-6, atol=1e-6)
            assert not np.allclose(want, params["base"][layer_key][group][w])
    np.testing.assert_array_equal(merged["embed"]["embedding"], params["base"]["embed"]["embedding"])
    # The LoRA model is the merged model.
    got = lora_apply({"params": {"base": params["base"], "lora": adapters}}, *args)
    np.testing.assert_allclose(got, apply({"params": merged}, *args), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, base_logits, atol=1e-3)


def test_a_lora_step_changes_only_adapters_and_the_base_holds_no_optimizer_state():
    config = small_config()
    model, lo, tx = _setup(config)
    state = quick_jit(lo.make_init_fn(tx, seed=0))()
    state = sharded_init.strip_boxes(state)
    before = jax.device_get(state.params)
    step = quick_jit(make_step(next_token(lo.apply), tx, trainable="lora"), state, _batch(config))
    for _ in range(2):
        state, metrics = step(state, _batch(config))
    after = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, after["base"], before["base"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), after["lora"], before["lora"])
    assert all(jax.tree.leaves(changed))
    # Adam moments exist for the adapters only: two per adapter element.
    state_elems = sum(x.size for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size") and x.ndim)
    adapter_elems = sum(x.size for x in jax.tree.leaves(after["lora"]))
    assert state_elems == 2 * adapter_elems
    assert bool(metrics["finite"])


def _lora_step(config, mesh_config, n, batch_np, lora_config=LoraConfig(targets=TARGETS, rank=4)):
    model, lo, tx = _setup(config, lora_config)
    mesh = make_mesh(mesh_config, jax.devices()[:n])
    with jax.set_mesh(mesh):
        init = lo.make_init_fn(tx, seed=0)
        abstract = sharded_init.abstract_state(init, mesh)
        state = sharded_init.materialize(init, abstract)
        # Nonzero B, so that the base and the adapters both shape the gradients.
        state = state.replace(params={**state.params, "lora": jax.tree.map(
            lambda x, s: jax.device_put(x, s), _random_b(state.params["lora"]),
            jax.tree.map(lambda a: a.sharding, abstract.params["lora"]))})
        step = jax.jit(make_step(next_token(lo.apply), tx, trainable="lora"), donate_argnums=0)
        state, metrics = step(state, global_batch(batch_np, mesh))
        return abstract, jax.device_get((metrics["loss"], metrics["grad_norm"], state.params["lora"], state.params["base"]))


@pytest.mark.slow  # two compilations of the step, single device and 2x4
def test_sharded_2x4_lora_step_equals_single_device():
    config = small_config()
    batch = _batch(config)
    _, ref = _lora_step(config, MeshConfig(fsdp=1), 1, batch)
    abstract, got = _lora_step(config, MeshConfig(fsdp=2, tensor=4), 8, batch)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5)
    # Adam divides by |g|, amplifying float32 noise in tiny gradients: compare to half a percent of the step (lr 1e-2).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=5e-5), got[2], ref[2])
    # The adapters follow the weights' logical axes: q's A splits embed over fsdp, its B splits heads over tensor.
    q = abstract.params["lora"]["layers"]["attn"]["q"]
    assert q["a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert q["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)


# Blocks of 16 split mlp=64 into 4 blocks, which tensor=4 can shard.
QLORA = {fmt: LoraConfig(targets=TARGETS, rank=4, quantize=fmt, block_size=16) for fmt in ("int8", "nf4")}


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_qlora_base_codes_and_scales_shard_like_their_weights(fmt):
    from jaxlm.model.quantize import QuantizedArray

    config = small_config()
    _, lo, tx = _setup(config, QLORA[fmt])
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4), jax.devices())
    with jax.set_mesh(mesh):
        init = lo.make_init_fn(tx, seed=0)
        abstract = sharded_init.abstract_state(init, mesh)
        base = sharded_init.materialize(init, abstract).params["base"]
    P = jax.sharding.PartitionSpec
    # up (layers, embed, mlp): codes (layers, embed, mlp blocks, block) with the block count split like mlp.
    for leaf in (base["layers"]["mlp"]["up"].codes, base["layers"]["mlp"]["up"].scale):
        assert leaf.sharding.spec == P(None, "fsdp", "tensor", None)
        assert leaf.addressable_shards[0].data.shape[1:3] == (config.model.d_model // 2, 1)
    assert base["layers"]["mlp"]["down"].codes.sharding.spec == P(None, "tensor", "fsdp", None)
    quantized = [x for x in jax.tree.leaves(base, is_leaf=lambda x: isinstance(x, QuantizedArray))
                 if isinstance(x, QuantizedArray)]
    assert len(quantized) == 8  # q k v o gate up down and the output head
    assert all(not x.codes.sharding.is_fully_replicated for x in quantized)


@pytest.mark.slow  # two compilations of the step per format, single device and 2x4
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_sharded_2x4_qlora_step_equals_single_device(fmt):
    config = small_config()
    batch = _batch(config)
    _, ref = _lora_step(config, MeshConfig(fsdp=1), 1, batch, QLORA[fmt])
    _, got = _lora_step(config, MeshConfig(fsdp=2, tensor=4), 8, batch, QLORA[fmt])
    jax.tree.map(np.testing.assert_array_equal, got[3], ref[3])  # the same codes and scales, sharded or not
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=5e-5), got[2], ref[2])


@pytest.mark.slow  # ~20 s; saved adapters are read back by default in test_initial_adapters_continue_...[jaxlm]
def test_adapters_save_and_load(tmp_path):
    config = small_config()
    _, lo, _ = _setup(config)
    adapters = _random_b(sharded_init.strip_boxes(lo.init(jax.random.key(0))))
    lora_lib.save_adapters(str(tmp_path), adapters, lo.config)
    loaded = lora_lib.load_adapters(str(tmp_path), lo)
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
    _, other, _ = _setup(config, LoraConfig(targets=TARGETS, rank=2))
    with pytest.raises(ConfigError, match="expected"):
        lora_lib.load_adapters(str(tmp_path), other)


def _lora_logits(lo, base, adapters, config):
    variables, inputs = {"params": {"base": base, "lora": adapters}}, _batch(config)["inputs"]
    return np.asarray(quick_jit(lo.apply, variables, inputs)(variables, inputs))


@pytest.mark.parametrize("fmt", ["jaxlm", pytest.param("peft", marks=pytest.mark.slow)])  # the PEFT reader: test_peft.py
def test_initial_adapters_continue_from_saved_or_peft_adapters(fmt, tmp_path):
    from jaxlm.hf import peft as peft_lib

    config = small_config()
    # Saved with alpha 8, continued with alpha 16: B is halved, so the model is the same.
    saved_lo = _setup(config, LoraConfig(targets=TARGETS, rank=4, alpha=8.0))[1]
    _, lo, _ = _setup(config, LoraConfig(targets=TARGETS, rank=4, alpha=16.0))
    # "+DIR": adapters over a base named before the "+" (here none: the random base of the same seed)
    start = dataclasses.replace(config, model=dataclasses.replace(config.model, init_from=f"+{tmp_path}/ad"))
    params = sharded_init.strip_boxes(quick_jit(saved_lo.make_params_fn(0))())
    adapters = jax.device_get(_random_b(params["lora"]))
    if fmt == "jaxlm":
        lora_lib.save_adapters(str(tmp_path / "ad"), adapters, saved_lo.config)
    else:
        peft_lib.export(adapters, saved_lo.config, config.model, str(tmp_path / "ad"))
    loaded = base.initial_adapters(start, lo)
    assert jax.tree.structure(loaded) == jax.tree.structure(sharded_init.strip_boxes(jax.eval_shape(lo.init, jax.random.key(0))))
    np.testing.assert_allclose(loaded["layers"]["attn"]["q"]["b"], adapters["layers"]["attn"]["q"]["b"] / 2, rtol=1e-6)
    want = _lora_logits(saved_lo, params["base"], adapters, config)
    assert not np.allclose(want, _lora_logits(lo, params["base"], params["lora"], config), atol=1e-3)  # B matters
    np.testing.assert_allclose(_lora_logits(lo, params["base"], loaded, config), want, rtol=1e-5, atol=1e-5)

    _, other_rank, _ = _setup(config, LoraConfig(targets=TARGETS, rank=2))
    with pytest.raises(ConfigError, match="set lora.rank=4"):
        base.initial_adapters(start, other_rank)
    _, fewer, _ = _setup(config, LoraConfig(targets=("attn/q$",), rank=4))
    with pytest.raises(ConfigError, match="set lora.targets"):
        base.initial_adapters(start, fewer)


def test_initial_adapters_from_a_directory_without_adapters_is_a_config_error(tmp_path):
    config = small_config()
    _, lo, _ = _setup(config)
    start = dataclasses.replace(config, model=dataclasses.replace(config.model, init_from=f"+{tmp_path}"))
    with pytest.raises(ConfigError, match="holds neither adapters.safetensors"):
        base.initial_adapters(start, lo)
    (tmp_path / "adapters.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot read .*adapters.json"):
        base.initial_adapters(start, lo)
    with pytest.raises(ConfigError, match="holds adapters outside a run directory.*BASE\\+"):
        base.parse(str(tmp_path))
    with pytest.raises(ConfigError, match="needs lora.targets"):
        base.resolve(start)


def test_bad_targets_are_config_errors():
    config = small_config()
    with pytest.raises(ConfigError, match="matches no parameter"):
        _setup(config, LoraConfig(targets=("attn/qq$",)))
    with pytest.raises(ConfigError, match="cannot take LoRA"):
        _setup(config, LoraConfig(targets=("embed",)))


@pytest.mark.parametrize("fmt, bound", [pytest.param("int8", 1 / 254, marks=pytest.mark.slow),
                                        pytest.param("nf4", float(np.diff(NF4_LEVELS).max()) / 2, marks=pytest.mark.slow)])
def test_qlora_base_within_quantization_error_and_finetuning_lowers_the_loss(fmt, bound):
    from jaxlm.model.quantize import block_size_for, nbytes

    config = small_config(d_model=64, mlp_dim=128)
    q_config = LoraConfig(targets=("attn/(q|v)$",), rank=4, quantize=fmt, block_size=32)
    model, lo, tx = _setup(config, q_config)
    _, float_lo, _ = _setup(config, dataclasses.replace(q_config, quantize="none"))
    params = sharded_init.strip_boxes(jax.jit(lo.make_params_fn(0))())
    float_base = sharded_init.strip_boxes(jax.jit(float_lo.make_params_fn(0))())["base"]
    dense = jax.jit(lo.merge)(params["base"], params["lora"])  # B = 0: the dequantized base
    q = float_base["layers"]["attn"]["q"]
    # Each block's error is at most half a quantization step of that block's absmax.
    b = block_size_for(q.shape[-1], fmt, 32)
    blocks = np.abs(np.asarray(q)).reshape(*q.shape[:-1], -1, b).max(-1, keepdims=True)
    err = np.abs(np.asarray(dense["layers"]["attn"]["q"]) - np.asarray(q)).reshape(blocks.shape[:-1] + (b,))
    assert np.all(err <= bound * blocks + 1e-7) and err.max() > 0
    # The frozen projections are stored quantized: int8 about a quarter of float32, NF4 about an eighth.
    proj = lambda tree: {k: tree["layers"][g][k] for g, ks in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                         for k in ks}
    ratio = nbytes(proj(params["base"])) / nbytes(proj(float_base))
    assert ratio < {"int8": 0.30, "nf4": 0.17}[fmt], ratio

    state = sharded_init.strip_boxes(jax.jit(lo.make_init_fn(tx, seed=0))())
    step = jax.jit(make_step(next_token(lo.apply), tx, trainable="lora"))
    batch = _batch(config)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses


def test_adapter_dropout_drops_rank_components_and_keeps_the_mean():
    config = small_config()
    _, lo, _ = _setup(config, LoraConfig(targets=("attn/q$",), rank=4, dropout=0.5))
    params = sharded_init.strip_boxes(jax.jit(lo.make_params_fn(0))())
    adapters = _random_b(params["lora"])
    merge = jax.jit(lambda rng: lo.merge(params["base"], adapters, rng)["layers"]["attn"]["q"])
    plain = jax.jit(lambda: lo.merge(params["base"], adapters)["layers"]["attn"]["q"])()
    a, b, c = merge(jax.random.key(1)), merge(jax.random.key(1)), merge(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, plain)
    # Kept components are scaled by 1 / (1 - p): averaged over many draws, the update is the undropped one.
    mean = jax.jit(jax.vmap(merge))(jax.random.split(jax.random.key(3), 2000)).mean(0)
    delta = np.abs(np.asarray(plain - params["base"]["layers"]["attn"]["q"])).max()
    assert np.abs(np.asarray(mean - plain)).max() < 0.1 * delta
