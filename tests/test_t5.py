"""The T5 encoder-decoder (jaxlm/model/t5.py) and its Hugging Face import/export: logits equal transformers'
for T5 v1.0, T5 v1.1, mT5 and UMT5 with padded inputs; the round trip is bit-exact and loads in transformers;
packed rows equal examples alone; the presets' parameter counts are Hugging Face's; scanned, unrolled and
sharded models agree; unsupported configs get one-line errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import quick_jit

pytest.importorskip("transformers")

from hf_models import hf_tensors  # noqa: E402
from jaxlm.core import flops, overrides, sharded_init  # noqa: E402
from jaxlm.core.config import ConfigError, MeshConfig, ModelConfig  # noqa: E402
from jaxlm.core.mesh import make_mesh  # noqa: E402
from jaxlm.core.sharding import global_batch  # noqa: E402
from jaxlm.hf import exporter, families, importer  # noqa: E402
from jaxlm.model import architectures  # noqa: E402
from jaxlm.model.transformer import count_params  # noqa: E402
from jaxlm.training.objectives import next_token  # noqa: E402

BASE = ModelConfig(dtype="float32", attention="xla")
# Odd shapes: d_kv * num_heads != d_model, 3 encoder and 2 decoder layers; inputs longer than the max distance.
SHAPE = dict(vocab_size=99, d_model=40, d_kv=12, num_heads=3, d_ff=56, num_layers=3, num_decoder_layers=2,
             relative_attention_num_buckets=8, relative_attention_max_distance=20)
KINDS = {  # (config class, model class, config, untied head)
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(feed_forward_proj="relu"), False),
    "t5_v1_1": ("T5Config", "T5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), True),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(tie_word_embeddings=False), True),
    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", dict(tie_word_embeddings=False), True),
}
RNG = np.random.default_rng(0)
ENC_LEN, DEC_LEN = 26, 9
INPUTS = RNG.integers(2, 99, size=(2, ENC_LEN))
INPUT_MASK = (np.arange(ENC_LEN)[None] < np.array([[ENC_LEN], [17]])).astype(np.int64)
DECODER_INPUTS = RNG.integers(2, 99, size=(2, DEC_LEN))
DECODER_MASK = (np.arange(DEC_LEN)[None] < np.array([[DEC_LEN], [6]])).astype(np.int64)


def save_t5(kind: str, directory: str, seed: int = 0, **config) -> str:
    """A random float32 model of `kind` with non-trivial norms; an untied head of its own (transformers 5
    ties every T5 head at construction and unties it only when a checkpoint has a different lm_head)."""
    import torch
    import transformers

    config_cls, model_cls, kwargs, untied = KINDS[kind]
    hf_config = getattr(transformers, config_cls)(**{**SHAPE, **kwargs, **config})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if untied:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(SHAPE["vocab_size"], SHAPE["d_model"]) * 0.15)
    model.save_pretrained(directory)
    return directory


def hf_logits(directory: str) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(directory, attn_implementation="eager",
                                                               dtype=torch.float32).eval()
    t = lambda a: torch.as_tensor(a, dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=t(INPUTS), attention_mask=t(INPUT_MASK), decoder_input_ids=t(DECODER_INPUTS),
                     decoder_attention_mask=t(DECODER_MASK)).logits.numpy()


def import_t5(directory: str, mesh=None, scan: bool = True):
    hf = importer.read_config(directory)
    config = dataclasses.replace(families.model_config(hf, BASE), scan_layers=scan)
    mesh = mesh or make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        return hf, config, importer.load_params(directory, config, mesh, progress=False)


def jaxlm_logits(config, params, **kwargs) -> np.ndarray:
    model = architectures.build(config)
    positions = lambda a: np.broadcast_to(np.arange(a.shape[1]), a.shape)
    fn = lambda p: model.apply({"params": p}, INPUTS, positions(INPUTS), INPUT_MASK, DECODER_INPUTS,
                               positions(DECODER_INPUTS), DECODER_MASK, **kwargs)
    return jax.tree.map(np.asarray, quick_jit(fn, params)(params))


def assert_close_where_real(got, expected, atol=1e-4):
    real = DECODER_MASK.astype(bool)
    assert np.max(np.abs(got[real] - expected[real])) <= atol


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_imported_logits_match_transformers(kind, tmp_path):
    directory = save_t5(kind, str(tmp_path / kind))
    _, config, params = import_t5(directory)
    assert config.tie_embeddings == (kind == "t5") and config.relative_bias_per_layer == (kind == "umt5")
    assert config.resolved_mlp_activation == ("relu" if kind == "t5" else "gated_gelu_tanh")
    assert_close_where_real(jaxlm_logits(config, params), hf_logits(directory))


@pytest.mark.parametrize("kind", ["t5", "mt5", "umt5"])
def test_export_round_trip_is_lossless_and_loads_in_transformers(kind, tmp_path):
    src = save_t5(kind, str(tmp_path / "src"))
    hf, config, params = import_t5(src, scan=kind != "umt5")
    out = str(tmp_path / "out")
    os.makedirs(out)
    exporter.write_checkpoint(params, config, out, "float32", progress=False)
    written = families.hf_config(config, hf, "float32")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(written, f)
    model_cls = KINDS[kind][1]
    assert written["architectures"] == [model_cls] and written["model_type"] == kind
    before, after = hf_tensors(src), hf_tensors(out)
    assert sorted(before) == sorted(after)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    np.testing.assert_array_equal(hf_logits(out), hf_logits(src))


def test_export_without_template_loads_in_transformers(tmp_path):
    """A model trained from scratch: the config.json is written from the jaxlm config alone."""
    src = save_t5("t5_v1_1", str(tmp_path / "src"))
    _, config, params = import_t5(src)
    out = str(tmp_path / "out")
    os.makedirs(out)
    exporter.write_checkpoint(params, config, out, "float32", progress=False)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(families.hf_config(config, None, "float32"), f)
    np.testing.assert_array_equal(hf_logits(out), hf_logits(src))


def small_config(**model) -> ModelConfig:
    fields = dict(architecture="t5", vocab_size=99, d_model=40, head_dim=12, num_heads=3, num_kv_heads=3, mlp_dim=56,
                  num_layers=3, num_decoder_layers=2, relative_buckets=8, relative_max_distance=20, dtype="float32",
                  attention="xla")
    return ModelConfig(**{**fields, **model})


def random_params(config: ModelConfig, seed: int = 0):
    model = architectures.build(config)
    init = lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    key = jax.random.key(seed)
    return model, quick_jit(init, key)(key)


@pytest.mark.parametrize("per_layer", [False, True])
def test_packed_rows_equal_examples_alone(per_layer):
    model, params = random_params(small_config(relative_bias_per_layer=per_layer, tie_embeddings=not per_layer))
    rng = np.random.default_rng(1)
    examples = [(rng.integers(2, 99, 23), rng.integers(2, 99, 5)), (rng.integers(2, 99, 7), rng.integers(2, 99, 4))]

    def rows(packings, length):  # tokens, positions, segment ids (B, length) of pieces packed into padded rows
        out = np.zeros((3, len(packings), length), np.int32)
        for r, pieces in enumerate(packings):
            at = 0
            for s, piece in enumerate(pieces, 1):
                out[:, r, at:at + len(piece)] = np.stack([piece, np.arange(len(piece)), np.full(len(piece), s)])
                at += len(piece)
        return list(out)

    # Row 0 packs both examples, rows 1 and 2 hold one each (padded to the same length).
    packings = [examples, examples[:1], examples[1:]]
    args = (*rows([[e for e, _ in p] for p in packings], 32), *rows([[d for _, d in p] for p in packings], 12))
    logits = quick_jit(lambda *a: model.apply({"params": params}, *a), *args)(*args)
    n = len(examples[0][1])
    np.testing.assert_allclose(logits[0, :n], logits[1, :n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, n:n + len(examples[1][1])], logits[2, :len(examples[1][1])], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_hidden_states_times_head_are_the_logits(tied):
    config = small_config(tie_embeddings=tied)
    _, params = random_params(config)
    logits = jaxlm_logits(config, params)
    h, head = jaxlm_logits(config, params, hidden=True)
    assert h.shape == (*DECODER_INPUTS.shape, config.d_model) and head.shape == (config.vocab_size, config.d_model)
    np.testing.assert_allclose(h @ head.T, logits, rtol=1e-6, atol=1e-6)


def test_scanned_and_unrolled_layers_give_the_same_logits(tmp_path):
    directory = save_t5("umt5", str(tmp_path / "m"))
    _, config, scanned = import_t5(directory, scan=True)
    unrolled_config, unrolled = import_t5(directory, scan=False)[1:]
    assert "layers_2" in unrolled["encoder"] and "layers_1" in unrolled["decoder"]
    np.testing.assert_allclose(jaxlm_logits(unrolled_config, unrolled), jaxlm_logits(config, scanned),
                               rtol=1e-6, atol=1e-6)


def hf_param_count(m: ModelConfig) -> int:
    """transformers' own count, of a model built on the meta device (no weights): the shared embedding once."""
    import torch
    import transformers

    config = transformers.T5Config(
        vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.resolved_head_dim, d_ff=m.mlp_dim, num_layers=m.num_layers,
        num_decoder_layers=m.resolved_decoder_layers, num_heads=m.num_heads,
        relative_attention_num_buckets=m.relative_buckets, relative_attention_max_distance=m.relative_max_distance,
        feed_forward_proj={"relu": "relu", "gated_gelu_tanh": "gated-gelu"}[m.resolved_mlp_activation],
        tie_word_embeddings=m.tie_embeddings)
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(config)
        if not m.tie_embeddings:  # as loading a checkpoint with its own lm_head does (save_t5)
            model.lm_head.weight = torch.nn.Parameter(torch.empty(m.vocab_size, m.d_model))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset, published", [
    ("t5_small", 60_506_624), ("flan_t5_base", 247_577_856), ("t5_v1_1_xl", 2_849_757_184),
])
def test_preset_parameter_counts_equal_hugging_face(preset, published):
    m = overrides.load([preset]).model
    ours = count_params(sharded_init.abstract_params(architectures.build(m)))
    assert ours == hf_param_count(m) == published


def test_flops_count_both_stacks_and_cross_attention():
    c = small_config(mlp_activation="gated_gelu_tanh")
    params = sharded_init.abstract_params(architectures.build(c))
    matmul = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                 if str(path[-1].key) in ("q", "k", "v", "o", "wi_0", "wi_1", "wo", "lm_head"))
    assert flops.matmul_params(c) == matmul  # untied: the head is lm_head
    nh = c.num_heads * c.resolved_head_dim
    attention = 12 * nh * (3 * 16 * 16 + 2 * 16 * 32)
    assert flops.flops_per_token(c, 16) == pytest.approx((6 * matmul * 16 + attention) / 32)


def test_sharded_loss_and_gradients_equal_single_device():
    config = small_config(vocab_size=128, d_model=32, head_dim=8, num_heads=4, num_kv_heads=4, mlp_dim=64,
                          num_layers=2, mlp_activation="gated_gelu_tanh", tie_embeddings=False)
    rng = np.random.default_rng(2)
    b, s, t = 8, 16, 8
    seg = lambda n, cut: (np.arange(n) >= cut).astype(np.int32)[None].repeat(b, 0) + 1
    pos = lambda n, cut: np.where(np.arange(n) < cut, np.arange(n), np.arange(n) - cut)[None].repeat(b, 0).astype(np.int32)
    batch_np = {"inputs": rng.integers(0, 128, (b, s)).astype(np.int32), "positions": pos(s, 10),
                "segment_ids": seg(s, 10), "decoder_inputs": rng.integers(0, 128, (b, t)).astype(np.int32),
                "decoder_positions": pos(t, 5), "decoder_segment_ids": seg(t, 5),
                "targets": rng.integers(0, 128, (b, t)).astype(np.int32), "loss_mask": np.ones((b, t), np.int32)}
    model = architectures.build(config)
    init = sharded_init.make_init_fn(model, optax.sgd(0.1), seed=0)

    def run(mesh):
        with jax.set_mesh(mesh):
            state, _ = sharded_init.create(init, mesh)
            batch = global_batch(batch_np, mesh)
            loss_fn = lambda p: next_token(model.apply).loss(p, batch, None)[1]["loss"] / batch["loss_mask"].sum()
            loss, grads = quick_jit(jax.value_and_grad(loss_fn), state.params)(state.params)
            return state.params, jax.device_get((loss, grads))

    _, ref = run(make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]))
    params, got = run(make_mesh(MeshConfig(fsdp=2, tensor=4)))
    q = params["decoder"]["layers"]["cross"]["q"]  # (L, D, N, H): embed over fsdp, heads over tensor
    assert q.addressable_shards[0].data.shape == (2, 16, 1, 8)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got[1], ref[1])


@pytest.mark.parametrize("change, fragment", [
    (dict(feed_forward_proj="gated-silu"), "feed_forward_proj='gated-silu' is not supported"),
    (dict(dense_act_fn="gelu"), "dense_act_fn='gelu' is not supported with feed_forward_proj='relu'"),
    (dict(is_encoder_decoder=False), "is_encoder_decoder=False"),
])
def test_unsupported_configs_are_one_line_errors(change, fragment, tmp_path):
    hf = {**SHAPE, "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "feed_forward_proj": "relu",
          **change}
    with pytest.raises(ConfigError) as e:
        families.model_config(hf, BASE)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_models_without_a_t5_layout_do_not_export():
    with pytest.raises(ConfigError, match=r"^model.architecture=t5 with model.mlp_activation=gated_silu .*cannot be"):
        families.hf_config(small_config(mlp_activation="gated_silu"), None, "float32")


def test_long_rows_attend_in_query_blocks_with_the_same_result():
    """Rows of 2 x QUERY_BLOCK queries or more go in blocks (a last partial one here); the result equals one
    pass over the whole square, bias and padding mask included."""
    from jaxlm.model import t5

    b, t, s, n, h = 2, 2 * t5.QUERY_BLOCK + 37, 300, 3, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, shape) for key, shape in zip(keys, [(b, t, n, h), (b, s, n, h), (b, s, n, h)]))
    bias = jax.random.normal(keys[3], (b, n, t, s))
    allowed = jnp.broadcast_to(jnp.arange(s)[None, None, :] < jnp.array([s, 211])[:, None, None], (b, t, s))
    whole = t5._biased_block(q, k, v, bias, allowed)
    np.testing.assert_allclose(t5.biased_attention(q, k, v, bias, allowed), whole, rtol=1e-6, atol=1e-6)


def test_default_quantization_covers_t5s_matmul_weights():
    """Weight-only quantization (`jaxlm generate --quantize`) takes cross-attention and the wi/wo MLPs, not
    only what a decoder-only model names its weights, and leaves the relative position tables in float."""
    from jaxlm.core import overrides, sharded_init
    from jaxlm.model import architectures
    from jaxlm.model.quantize import is_quantized, quantize_params

    c = dataclasses.replace(overrides.load(["t5_tiny"]).model, vocab_size=512)
    model = architectures.build(c)
    params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    quantized = quantize_params(sharded_init.strip_boxes(params), "int8", 32)
    layers = quantized["decoder"]["layers"]
    assert all(is_quantized(x) for x in (layers["cross"]["q"], layers["mlp"]["wi_0"], layers["mlp"]["wo"],
                                         quantized["lm_head"]))
    assert not is_quantized(quantized["decoder"]["relative_bias"])
    tokens = jnp.arange(16).reshape(2, 8)
    logits = model.apply({"params": quantized}, tokens)
    want = model.apply({"params": params}, tokens)
    assert float(jnp.max(jnp.abs(logits - want))) < 0.05 * float(jnp.max(jnp.abs(want)))
