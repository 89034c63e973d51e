"""The BERT-family encoder (jaxlm/model/bert.py) and its Hugging Face import/export (jaxlm/hf/bert_family.py):
masked-LM logits equal transformers' for BertForMaskedLM and RobertaForMaskedLM (with padding and token
types), export is lossless, packed rows equal their documents alone, the hidden-state contract holds, scanned
equals unrolled, and a sharded loss and its gradients equal one device's."""

import dataclasses
import shutil
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from conftest import quick_jit  # noqa: E402
from hf_models import hf_tensors  # noqa: E402
from jaxlm.core import flops, sharded_init  # noqa: E402
from jaxlm.core.config import ConfigError, MeshConfig, ModelConfig  # noqa: E402
from jaxlm.core.mesh import make_mesh  # noqa: E402
from jaxlm.core.sharding import global_batch  # noqa: E402
from jaxlm.hf import exporter, families, importer  # noqa: E402
from jaxlm.model.architectures import build  # noqa: E402
from jaxlm.training.losses import head_logits  # noqa: E402
from jaxlm.training.objectives import next_token  # noqa: E402

BASE = ModelConfig(dtype="float32", attention="xla")
# Odd shapes: vocabulary 101, width 36 (3 heads of 12), MLP 52, 3 layers, 40 positions.
COMMON = dict(vocab_size=101, hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=52,
              max_position_embeddings=40, initializer_range=0.1)
ENCODERS = {
    "bert": ("BertConfig", dict(COMMON, type_vocab_size=2)),
    "roberta": ("RobertaConfig", dict(COMMON, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)),
}
LENGTHS = (12, 9, 5)  # three rows, padded on the right to 12


def make_encoder(family: str, seed: int = 0, **config):
    """A random float32 masked-LM model with non-trivial norms and biases."""
    import torch
    import transformers

    config_cls, kwargs = ENCODERS[family]
    config = getattr(transformers, config_cls)(**{**kwargs, **config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_mlm_logits(directory: str, tokens, mask, token_types=None) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForMaskedLM.from_pretrained(directory, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    kwargs = {} if token_types is None else {"token_type_ids": torch.as_tensor(token_types)}
    with torch.no_grad():
        return model(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask), **kwargs).logits.numpy()


def padded_batch(family: str):
    """(tokens, mask, token types or None): real tokens avoid RoBERTa's pad id, which its positions key on."""
    rng = np.random.default_rng(1)
    t = max(LENGTHS)
    mask = (np.arange(t)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    pad = 1 if family == "roberta" else 0
    tokens = np.where(mask, rng.integers(3, 101, size=(len(LENGTHS), t)), pad)
    types = (np.arange(t)[None] >= 4).astype(np.int64) * mask if family == "bert" else None
    return tokens, mask, types


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> directory of a saved random model."""
    root = tmp_path_factory.mktemp("encoders")
    out = {}
    for family in ENCODERS:
        out[family] = str(root / family)
        make_encoder(family).save_pretrained(out[family])
    return out


def one_device_mesh():
    return make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


def import_model(directory: str, scan: bool = True, mesh=None):
    hf = importer.read_config(directory)
    config = dataclasses.replace(families.model_config(hf, BASE), scan_layers=scan)
    mesh = mesh or one_device_mesh()
    with jax.set_mesh(mesh):
        return hf, config, importer.load_params(directory, config, mesh, progress=False)


def jaxlm_logits(config, params, tokens, mask, types=None, **kwargs):
    t = tokens.shape[1]
    positions = np.broadcast_to(np.arange(t), tokens.shape)
    return build(config).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                               jnp.asarray(mask), token_types=None if types is None else jnp.asarray(types), **kwargs)


@pytest.mark.parametrize("family", list(ENCODERS))
def test_imported_logits_match_transformers(family, saved):
    hf, config, params = import_model(saved[family])
    assert (config.architecture, config.position_offset, config.max_seq_len) == (
        ("bert", 0, 40) if family == "bert" else ("bert", 2, 38))
    tokens, mask, types = padded_batch(family)
    want = hf_mlm_logits(saved[family], tokens, mask, types)
    got = np.asarray(jaxlm_logits(config, params, tokens, mask, types))
    assert got.dtype == np.float32 and got.shape == (3, 12, 101)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, scan", [("bert", False), ("roberta", True)])
def test_export_round_trip_is_lossless_and_loads_in_transformers(family, scan, saved, tmp_path):
    hf, config, params = import_model(saved[family], scan)
    out = str(tmp_path / "out")
    os.makedirs(out)
    exporter.write_checkpoint(params, config, out, "float32", progress=False)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(families.hf_config(config, hf, "float32"), f)
    before, after = hf_tensors(saved[family]), hf_tensors(out)
    assert sorted(before) == sorted(after)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    tokens, mask, types = padded_batch(family)
    want = hf_mlm_logits(saved[family], tokens, mask, types)
    np.testing.assert_array_equal(hf_mlm_logits(out, tokens, mask, types), want)
    # Without a template the family still follows from the config (RoBERTa: the position offset).
    fresh = families.hf_config(config, None, "float32")
    assert fresh["architectures"] == [families.FAMILY_ARCHITECTURE[family]]
    assert fresh["max_position_embeddings"] == 40 and fresh["pad_token_id"] == (1 if family == "roberta" else 0)


def test_scanned_equals_unrolled_and_hidden_states_give_the_logits(saved):
    tokens, mask, types = padded_batch("bert")
    _, scanned, params = import_model(saved["bert"], scan=True)
    _, unrolled, unrolled_params = import_model(saved["bert"], scan=False)
    logits = jaxlm_logits(scanned, params, tokens, mask, types)
    np.testing.assert_allclose(jaxlm_logits(unrolled, unrolled_params, tokens, mask, types), logits, atol=1e-6, rtol=0)
    h, head = jaxlm_logits(scanned, params, tokens, mask, types, hidden=True)
    assert h.shape == (3, 12, 37) and head.shape == (101, 37)  # the output bias rides as an extra column
    # What the objectives compute from them (jaxlm.training.losses), exactly; any other product, closely.
    np.testing.assert_array_equal(np.asarray(head_logits(h, head)), np.asarray(logits))
    np.testing.assert_allclose(np.asarray(jnp.einsum("btd,vd->btv", h, head)), np.asarray(logits), atol=1e-6, rtol=0)


def test_packed_rows_equal_each_document_alone(saved):
    _, config, params = import_model(saved["roberta"])
    rng = np.random.default_rng(2)
    a, b = rng.integers(3, 101, size=7), rng.integers(3, 101, size=4)
    tokens = np.concatenate([a, b, [1]])[None]  # two documents and a pad
    segments = np.array([[1] * 7 + [2] * 4 + [0]])
    positions = np.concatenate([np.arange(7), np.arange(4), [0]])[None]
    model = build(config)
    packed = model.apply({"params": params}, tokens, positions, segments)
    alone_a = jaxlm_logits(config, params, a[None], np.ones((1, 7), np.int64))
    alone_b = jaxlm_logits(config, params, b[None], np.ones((1, 4), np.int64))
    np.testing.assert_allclose(packed[0, :7], alone_a[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[0, 7:11], alone_b[0], atol=1e-5, rtol=0)


def test_legacy_names_tied_copies_pooler_and_buffers_are_read(saved, tmp_path):
    """Old uploads: LayerNorm.gamma/beta, the decoder's tied copies, a pooler, the position id buffer."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(saved["bert"], "model.safetensors"))
    edited = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in tensors.items()}
    edited.update({"cls.predictions.decoder.weight": tensors["bert.embeddings.word_embeddings.weight"],
                   "cls.predictions.decoder.bias": tensors["cls.predictions.bias"],
                   "bert.pooler.dense.weight": np.zeros((36, 36), np.float32),
                   "bert.pooler.dense.bias": np.zeros(36, np.float32),
                   "bert.embeddings.position_ids": np.arange(40)[None]})
    directory = tmp_path / "old"
    directory.mkdir()
    save_file(edited, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(open(os.path.join(saved["bert"], "config.json")).read())
    _, _, want = import_model(saved["bert"])
    _, _, got = import_model(str(directory))
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("family, change, field", [
    ("bert", dict(position_embedding_type="relative_key"), "position_embedding_type"),
    ("bert", dict(hidden_act="relu"), "hidden_act"),
    ("roberta", dict(hidden_act="gelu_new"), "hidden_act"),  # RoBERTa's head is exact GELU whatever this says
    ("bert", dict(is_decoder=True), "is_decoder"),
    ("bert", dict(tie_word_embeddings=False), "tie_word_embeddings"),
])
def test_unsupported_configs_are_one_line_errors(family, change, field, saved):
    hf = {**importer.read_config(saved[family]), **change}
    with pytest.raises(ConfigError) as e:
        families.model_config(hf, BASE)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_gelu_new_bert_and_export_limits():
    hf = {"architectures": ["BertForMaskedLM"], **COMMON, "hidden_act": "gelu_new", "type_vocab_size": 2}
    config = families.model_config(hf, BASE)
    assert config.resolved_mlp_activation == "gelu_tanh"
    assert families.hf_config(config, None, "float32")["hidden_act"] == "gelu_new"
    with pytest.raises(ConfigError, match="type_vocab_size=0"):
        families.family_for(dataclasses.replace(config, type_vocab_size=0))
    with pytest.raises(ConfigError, match="mlp_activation=gelu_tanh"):
        families.family_for(dataclasses.replace(config, position_offset=2))


def encoder_config(**fields) -> ModelConfig:
    """An encoder whose axes split over fsdp=2 x tensor=4 (vocabulary, heads, MLP)."""
    return ModelConfig(**{**dict(architecture="bert", vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                                 num_kv_heads=4, mlp_dim=64, max_seq_len=32, type_vocab_size=2, position_offset=2,
                                 dtype="float32", attention="xla"), **fields})


def mlm_batch(b=8, t=16, seed=0):
    """Two packed documents per row (the second restarting its positions, with token type 1), 15% masked."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(4, 128, size=(b, t)).astype(np.int32)
    segments = np.where(np.arange(t) < 10, 1, 2)[None].repeat(b, 0).astype(np.int32)
    positions = np.where(segments == 1, np.arange(t), np.arange(t) - 10).astype(np.int32)
    masked = rng.random((b, t)) < 0.15
    masked[:, 0] = True
    return {"inputs": np.where(masked, 3, targets).astype(np.int32), "targets": targets, "positions": positions,
            "segment_ids": segments, "token_types": (segments - 1).astype(np.int32),
            "loss_mask": masked.astype(np.int32)}


def _loss_and_grads(config, mesh_config, n, batch_np):
    mesh = make_mesh(mesh_config, jax.devices()[:n])
    model = build(config)
    init = lambda: {"params": model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]}
    with jax.set_mesh(mesh):
        params = sharded_init.materialize(init, sharded_init.abstract_state(init, mesh))["params"]
        batch = global_batch(batch_np, mesh)
        nll = lambda p: next_token(model.apply).loss(p, batch, None)[1]["loss"] / batch["loss_mask"].sum()
        return jax.device_get(quick_jit(jax.value_and_grad(nll), params)(params))


def test_sharded_loss_and_gradients_equal_single_device():
    config, batch = encoder_config(), mlm_batch()
    loss, grads = _loss_and_grads(config, MeshConfig(fsdp=1), 1, batch)
    sharded_loss, sharded_grads = _loss_and_grads(config, MeshConfig(fsdp=2, tensor=4), 8, batch)
    assert np.isfinite(loss) and loss > 0
    np.testing.assert_allclose(sharded_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), sharded_grads, grads)
    assert np.abs(grads["mlm"]["bias"]).sum() > 0 and np.abs(grads["type_embed"]).sum() > 0


def test_flops_count_the_encoder_matmuls():
    config = encoder_config()
    params = sharded_init.abstract_params(build(config))
    d, v, f, layers = config.d_model, config.vocab_size, config.mlp_dim, config.num_layers
    # q, k, v, o and the two MLP matrices per layer, the MLM transform, and the tied head.
    assert flops.matmul_params(config) == layers * (4 * d * d + 2 * d * f) + d * d + v * d
    weights = [x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
               if not re.search(r"bias|norm|pos_embed|type_embed", jax.tree_util.keystr(p))]
    assert flops.matmul_params(config) == sum(weights)


def test_convert_from_hf_makes_an_mlm_run_that_generate_refuses(saved, tmp_path):
    """`jaxlm convert from-hf` of a BERT needs no architecture or objective: the checkpoint's encoder brings
    masked LM; the run's logits equal the checkpoint's, and text generation is one line."""
    from jaxlm.conversion import hf_runs
    from jaxlm.core.config import ConfigError
    from jaxlm.inference.load import GENERATES, load_run

    from hf_models import save_tokenizer

    src = str(tmp_path / "src")
    shutil.copytree(saved["bert"], src)
    save_tokenizer(src, vocab_size=101)
    config = hf_runs.from_hf(src, str(tmp_path / "run"))
    assert config.model.architecture == "bert" and config.objective.kind == "mlm"
    run = load_run(str(tmp_path / "run"), language_model=True)
    tokens, mask, types = padded_batch("bert")
    ours = jaxlm_logits(run.model.config, run.params, tokens, mask, types)
    np.testing.assert_allclose(ours[mask > 0], hf_mlm_logits(saved["bert"], tokens, mask, types)[mask > 0], atol=1e-4)
    with pytest.raises(ConfigError, match="is an encoder .* jaxlm generate runs"):
        load_run(str(tmp_path / "run"), architectures=GENERATES, purpose="jaxlm generate")
