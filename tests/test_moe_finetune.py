"""LoRA, QLoRA, generation and evaluation on mixture-of-experts models: per-expert adapters, zero-B equals the
base, merging, gradients only to adapters, a quantized expert base, cached decoding against the full forward,
and dropless scoring and perplexity.

Compiles dominate the time, so the module shares one random model and two compiled forwards over a
(2, T) batch: the base (the merged model and the decoding and scoring references too) and the LoRA model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import quick_jit, small_config

from jaxlm.core import sharded_init
from jaxlm.core.config import ConfigError, LoraConfig, MeshConfig, SamplingConfig
from jaxlm.core.mesh import make_mesh
from jaxlm.core.sharding import global_batch
from jaxlm.core.train_state import TrainState
from jaxlm.evaluation import runner
from jaxlm.inference.generate import Generator
from jaxlm.inference.scoring import Scorer
from jaxlm.model import lora as lora_lib
from jaxlm.model import quantize as Q
from jaxlm.model.transformer import Transformer
from jaxlm.training import optim
from jaxlm.training.finetune import _nbytes
from jaxlm.training.objectives import next_token
from jaxlm.training.step import make_step

MOE = dict(num_experts=4, experts_per_token=2, expert_mlp_dim=16, shared_expert_dim=16, shared_expert_gate=True)
EXPERTS = ("attn/(q|v)$", "moe/(gate|up|down)$", "moe/shared/(gate|up|down)$")
T = 48  # the shared batch's length: room for a 32-token (bucketed) prompt and 8 new tokens


def _config(**model):
    return small_config(**{**MOE, **model})


def _boxed(model):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def _setup(config, lora_config):
    model = Transformer(config.model)
    return model, lora_lib.Lora(model, lora_config, _boxed(model))


def _batch(config, seed=0):
    tokens = np.random.default_rng(seed).integers(0, config.model.vocab_size, size=(2, T + 1)).astype(np.int32)
    ones, positions = np.ones((2, T), np.int32), np.tile(np.arange(T, dtype=np.int32), (2, 1))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions, "segment_ids": ones,
            "loss_mask": ones}


def _random(tree, seed=1, scale=0.05):
    """Every leaf plus noise (numpy: eager jax.random compiles a kernel per leaf shape, seconds each)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + scale * rng.standard_normal(x.shape), x.dtype), tree)


@dataclasses.dataclass
class Moe:
    config: object
    model: Transformer
    lora: lora_lib.Lora
    params: dict  # {"base", "lora"}, B = 0
    base_logits: object  # (base params, tokens (2, T)) -> logits, dropless
    lora_logits: object  # ({"base", "lora"}, tokens (2, T)) -> logits


@pytest.fixture(scope="module")
def moe() -> Moe:
    """A random 2-layer scanned MoE model with adapters on attention, experts and the shared expert.
    ragged_dot: gradients compile 2x faster than with "blocks" on CPU (expert adapters are merged before
    either grouped matmul); decoding below runs "blocks"."""
    config = _config(moe_matmul="ragged_dot")
    model, lo = _setup(config, LoraConfig(targets=EXPERTS, rank=4))
    params = sharded_init.strip_boxes(quick_jit(lo.make_params_fn(0))())
    tokens = np.zeros((2, T), np.int32)
    base = quick_jit(lambda p, t: model.apply({"params": p}, t), params["base"], tokens)
    adapted = quick_jit(lambda p, t: lo.apply({"params": p}, t), params, tokens)
    return Moe(config, model, lo, params, lambda p, t: np.asarray(base(p, t)), lambda p, t: np.asarray(adapted(p, t)))


def test_expert_weights_get_an_adapter_per_expert_and_routing_weights_none():
    config = _config()
    _, lo = _setup(config, LoraConfig(targets=EXPERTS, rank=4))
    ad = jax.eval_shape(lo.init, jax.random.key(0))["layers"]
    e, d, f, r, layers = 4, 32, 16, 4, 2
    for name, (n_in, n_out) in {"gate": (d, f), "up": (d, f), "down": (f, d)}.items():
        a, b = ad["moe"][name]["a"], ad["moe"][name]["b"]
        assert a.value.shape == (layers, e, n_in, r) and b.value.shape == (layers, e, r, n_out)
        assert a.names[:2] == b.names[:2] == ("layers", "expert")  # shards with its expert, like the weight
    assert ad["moe"]["shared"]["down"]["a"].value.shape == (layers, 16, r)  # the shared expert: a plain MLP
    # A broad regex passes over the router and the shared expert's gate (routing stays the base's) ...
    _, broad = _setup(config, LoraConfig(targets=("(gate|up|down|router)$",), rank=4))
    assert sorted(broad.targets) == [f"layers/moe/{w}" for w in
                                     ("down", "gate", "shared/down", "shared/gate", "shared/up", "up")]
    # ... and one that matches only routing weights is an error, not a silent no-op.
    for pattern in ("router$", "shared_gate$"):
        with pytest.raises(ConfigError, match="only MoE routing weights"):
            _setup(config, LoraConfig(targets=("attn/q$", pattern), rank=4))
    # Unscanned, with dense and MoE layers mixed: the expert axis alone leads.
    mixed = _config(scan_layers=False, moe_every=2)
    _, lo = _setup(mixed, LoraConfig(targets=("(gate|up|down)$",), rank=4))
    assert lo.targets["layers_0/mlp/gate"].lead_shape == ()
    assert lo.targets["layers_1/moe/gate"].lead_shape == (e,)
    assert jax.eval_shape(lo.init, jax.random.key(0))["layers_1"]["moe"]["down"]["b"].value.shape == (e, r, d)


def test_expert_lora_starts_at_the_base_merges_exactly_and_trains_only_adapters(moe):
    lo, params, batch = moe.lora, moe.params, _batch(moe.config)
    tokens = batch["inputs"]
    base_logits = moe.base_logits(params["base"], tokens)
    np.testing.assert_array_equal(moe.lora_logits(params, tokens), base_logits)  # B = 0: exactly the base

    adapters = _random(params["lora"])
    merged = jax.jit(lo.merge)(params["base"], adapters)
    # Each expert's own update: W_e + scale * A_e @ B_e.
    ad, scale = adapters["layers"]["moe"]["down"], lo.config.alpha / lo.config.rank
    want = params["base"]["layers"]["moe"]["down"] + scale * jnp.einsum("lefr,lerd->lefd", ad["a"], ad["b"])
    np.testing.assert_allclose(merged["layers"]["moe"]["down"], want, rtol=1e-6, atol=1e-6)
    got = moe.lora_logits({"base": params["base"], "lora": adapters}, tokens)
    np.testing.assert_allclose(got, moe.base_logits(merged, tokens), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, base_logits, atol=1e-3)

    loss = lambda p: next_token(lo.apply).loss(p, batch, None)[0]
    start = {"base": params["base"], "lora": adapters}
    grads = quick_jit(jax.grad(loss), start)(start)
    assert not any(np.any(g) for g in jax.tree.leaves(grads["base"]))  # the base is frozen
    for path, g in lora_lib.flatten(grads["lora"]).items():
        per_slice = np.abs(np.asarray(g)).reshape(*lo.targets[path[:-2]].lead_shape, -1).max(-1)
        assert np.all(per_slice > 0), path  # every layer's every expert (each one is routed some tokens)


def test_qlora_on_an_moe_base_quantizes_the_experts_and_trains_on_the_dequantized_model(moe):
    config, params = moe.config, moe.params
    qc = LoraConfig(targets=EXPERTS, rank=4, quantize="nf4", block_size=8)
    lq = lora_lib.Lora(moe.model, qc, _boxed(moe.model))
    abstract = lq.abstract_params()["base"]["layers"]["moe"]  # what a random QLoRA start builds
    assert Q.is_quantized(abstract["gate"]) and Q.is_quantized(abstract["shared"]["down"])
    assert not Q.is_quantized(abstract["router"]) and not Q.is_quantized(abstract["shared_gate"])
    base = jax.jit(lambda p: Q.quantize_params(p, qc.quantize, qc.block_size))(params["base"])
    gate = base["layers"]["moe"]["gate"]  # (layers, experts, embed, mlp): blocks of 8 along mlp, 2 codes a byte
    assert gate.codes.shape == (2, 4, 32, 2, 4) and gate.scale.shape == (2, 4, 32, 2, 1)
    # Memory: half a byte per weight and a float32 scale per block of 8, counted alike by the finetune log.
    moe_bytes = lambda tree: Q.nbytes({k: v for k, v in tree["layers"]["moe"].items() if k in ("gate", "up", "down")})
    assert moe_bytes(base) == 3 * 2 * 4 * 32 * 16 * (1 / 2 + 4 / 8) == moe_bytes(params["base"]) / 4
    assert _nbytes(base) == Q.nbytes(base)

    # One finetuning step: its loss is the dequantized model's cross-entropy, the quantized base stays as
    # it is and the adapters move.
    adapters, batch = _random(params["lora"]), _batch(config)
    logits = moe.lora_logits({"base": jax.jit(Q.dequantize_params)(base), "lora": adapters}, batch["inputs"])
    logp = jax.nn.log_softmax(logits.astype(np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], axis=-1).mean()
    start = {"base": base, "lora": adapters}
    tx = optim.build_optimizer(config.optim, config.train.steps, jax.eval_shape(lambda: start), trainable=lq.trainable)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=start, opt_state=jax.jit(tx.init)(start),
                       rng=jax.random.key_data(jax.random.key(0)))
    new, metrics = quick_jit(make_step(next_token(lq.apply), tx, trainable="lora"), state, batch)(state, batch)
    assert float(metrics["loss"]) == pytest.approx(nll, rel=1e-5)
    jax.tree.map(np.testing.assert_array_equal, new.params["base"], base)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params["lora"]), jax.tree.leaves(adapters)))


def _qlora_step(mesh_config, devices: int):
    """(adapter A's sharding, loss, grad norm, adapters) after one QLoRA step from nonzero B, on a mesh."""
    config = _config(moe_matmul="ragged_dot")
    model, lq = _setup(config, LoraConfig(targets=EXPERTS, rank=4, quantize="nf4", block_size=8))
    tx = optim.build_optimizer(config.optim, config.train.steps, lq.abstract_params(), trainable=lq.trainable)
    batch = {k: np.tile(v, (4, 1)) for k, v in _batch(config).items()}  # 8 rows: one per device
    mesh = make_mesh(mesh_config, jax.devices()[:devices])
    with jax.set_mesh(mesh):
        init = lq.make_init_fn(tx, seed=0)
        abstract = sharded_init.abstract_state(init, mesh)
        state = sharded_init.materialize(init, abstract)
        shardings = jax.tree.map(lambda a: a.sharding, abstract.params["lora"])
        lora = jax.device_put(_random(jax.device_get(state.params["lora"])), shardings)
        state = state.replace(params={**state.params, "lora": lora})
        step = jax.jit(make_step(next_token(lq.apply), tx, trainable="lora"))
        state, metrics = step(state, global_batch(batch, mesh))
        spec = abstract.params["lora"]["layers"]["moe"]["gate"]["a"].sharding.spec
        return spec, *jax.device_get((metrics["loss"], metrics["grad_norm"], state.params["lora"]))


@pytest.mark.slow  # two compiled QLoRA steps (~90 s on 2 cores)
def test_expert_parallel_qlora_step_equals_single_device():
    _, *want = _qlora_step(MeshConfig(fsdp=1), 1)
    spec, *got = _qlora_step(MeshConfig(fsdp=2, expert=4), 8)
    assert spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", None)  # each device holds its experts' A
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=5e-5), got[2], want[2])


def _with(moe: Moe, **model) -> Transformer:
    """The fixture's model with other compute settings (same params); "auto" is "blocks" on CPU."""
    return Transformer(dataclasses.replace(moe.config.model, moe_matmul="auto", **model))


def _louder(base, factor: float = 4.0):
    """`base` with its routed experts scaled up: a random model's experts barely move the logits, so that
    dropping assignments (capacity) would hardly change them; x4 changes the greedy tokens."""
    moe = {**base["layers"]["moe"], **{k: base["layers"]["moe"][k] * factor for k in ("gate", "up", "down")}}
    return {**base, "layers": {**base["layers"], "moe": moe}}


def test_cached_greedy_decoding_equals_the_full_forward(moe):
    """Decoding (prefill and every step) runs the experts dropless, whatever the capacity factor: with 0.25
    a full forward would drop most assignments, so the reference is the dropless forward."""
    params, new_tokens = _louder(moe.params["base"]), 8
    prompts = [[1, 5, 9, 13, 17], [1, 40, 41, 42, 43, 44, 45, 46, 47]]  # left-padded to different lengths
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
    generated = np.stack(list(Generator(_with(moe, capacity_factor=0.25), params, sampling).stream(prompts)), axis=1)
    tokens = np.zeros((2, T), np.int32)  # right padding: invisible to the positions before it
    for i, p in enumerate(prompts):
        tokens[i, :len(p) + new_tokens] = [*p, *generated[i]]
    logits = moe.base_logits(params, tokens)
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(generated[i], np.argmax(logits[i, len(p) - 1:len(p) - 1 + new_tokens], axis=-1))
    assert len(set(generated.ravel().tolist())) > 2  # not a degenerate repetition


class Bytes:
    """A byte-level tokenizer: enough for perplexity."""

    bos_id = staticmethod(lambda: 1)
    encode = staticmethod(lambda text: [2 + b % 120 for b in text.encode()])


def test_scoring_and_perplexity_run_dropless_on_an_moe_model(moe):
    """With a capacity the rows of a batch would compete for the experts; the scorer runs dropless, so each
    request scores as it would alone."""
    params = _louder(moe.params["base"])
    model = _with(moe, capacity_factor=0.25)
    scorer = Scorer(model, params, batch_size=2)
    requests = [([1, 20, 21, 22], [23, 24]), ([1, *range(50, 80)], [7, 8, 9])]
    tokens = np.zeros((2, T), np.int32)
    for i, (context, continuation) in enumerate(requests):
        tokens[i, :len(context) + len(continuation) - 1] = (context + continuation)[:-1]
    logp = jax.nn.log_softmax(moe.base_logits(params, tokens), axis=-1)
    for i, ((context, continuation), score) in enumerate(zip(requests, scorer.loglikelihood(requests))):
        want = sum(float(logp[i, len(context) - 1 + j, t]) for j, t in enumerate(continuation))
        assert score.logprob == pytest.approx(want, abs=2e-5)

    texts = ["a mixture of experts routes each token", "to two of four experts " * 4]  # the second: 2 windows
    result = runner.run_tasks(model, params, Bytes(), moe.config, ["perplexity"], texts=texts, progress=False,
                              scorer=scorer)["perplexity"]
    assert result["tokens"] == sum(len(t) for t in texts) and np.isfinite(result["perplexity"])
    assert 1 < result["perplexity"] < 2 * moe.config.model.vocab_size  # a random model: about the vocabulary size
