"""Hugging Face mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): imported logits equal transformers',
export then re-import is lossless and transformers loads the export, KV-cache greedy decoding equals
transformers' generate, and configs jaxlm cannot express get one clear error naming the field."""

import dataclasses
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from conftest import quick_jit  # noqa: E402
from hf_models import MOE_FAMILIES, hf_logits, hf_tensors, make_model, save_model, save_tokenizer  # noqa: E402
from jaxlm import cli  # noqa: E402
from jaxlm.core.config import ConfigError, MeshConfig, ModelConfig  # noqa: E402
from jaxlm.core.mesh import make_mesh  # noqa: E402
from jaxlm.hf import exporter, families, importer  # noqa: E402
from jaxlm.model.transformer import Transformer  # noqa: E402

BASE = ModelConfig(dtype="float32", attention="xla")
TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 12))
FAMILY_NAMES = sorted(MOE_FAMILIES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> the directory of its small random model, saved once for the module."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = save_model(family, str(tmp_path_factory.mktemp(family)))
        return cache[family]

    return get


def one_device_mesh():
    return make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


def import_model(directory, mesh=None, **changes):
    hf = importer.read_config(directory)
    config = dataclasses.replace(families.model_config(hf, BASE), **changes)
    mesh = mesh or one_device_mesh()
    with jax.set_mesh(mesh):
        return hf, config, importer.load_params(directory, config, mesh, progress=False)


def jax_logits(config, params, tokens):
    apply = lambda p, t: Transformer(config, "xla").apply({"params": p}, t)
    return np.asarray(quick_jit(apply, params, jnp.asarray(tokens))(params, jnp.asarray(tokens)))


def export(params, config, template, out, dtype="float32"):
    os.makedirs(out)
    exporter.write_checkpoint(params, config, out, dtype, progress=False)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(families.hf_config(config, template, dtype), f)


def test_config_mapping(saved):
    cfgs = {f: families.model_config(importer.read_config(saved(f)), BASE) for f in FAMILY_NAMES}
    mixtral, qwen2, qwen3 = cfgs["mixtral"], cfgs["qwen2_moe"], cfgs["qwen3_moe"]
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.expert_mlp_dim, mixtral.mlp_dim) == (4, 2, 24, 24)
    assert mixtral.router == "softmax_topk" and mixtral.norm_topk_prob and mixtral.sliding_window == 0
    assert not mixtral.mixed_layers and mixtral.scan_layers and mixtral.router_aux_loss == 0.02
    assert (qwen2.num_experts, qwen2.expert_mlp_dim, qwen2.shared_expert_dim) == (5, 24, 20)
    assert qwen2.shared_expert_gate and qwen2.router_aux_loss == 0.02
    assert qwen2.qkv_bias and not qwen2.norm_topk_prob and qwen2.tie_embeddings and qwen2.scan_layers
    assert qwen3.qk_norm and qwen3.norm_topk_prob and qwen3.mlp_dim == 48 and qwen3.shared_expert_dim == 0
    assert [qwen3.is_moe_layer(i) for i in range(3)] == [False, True, True] and not qwen3.scan_layers
    # A dense import clears MoE fields a base config may carry.
    moe_base = dataclasses.replace(BASE, num_experts=8, shared_expert_dim=16, moe_every=2)
    dense = families.model_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 32,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
                                   "max_position_embeddings": 64}, moe_base)
    assert (dense.num_experts, dense.shared_expert_dim, dense.moe_every) == (0, 0, 1)


@pytest.mark.parametrize("dense_layers, step, layers, first, every", [
    ([], 1, 4, 0, 1), ([], 2, 4, 0, 2), ([0], 1, 4, 1, 1), ([0, 1], 1, 4, 2, 1), ([0, 2], 1, 4, 0, 2),
    ([1], 2, 4, 2, 2), ([0, 1, 2], 1, 4, 3, 1), ([], 3, 4, 0, 3),
])
def test_qwen_layouts_map_to_first_layer_and_every(saved, dense_layers, step, layers, first, every):
    hf = {**importer.read_config(saved("qwen3_moe")), "num_hidden_layers": layers, "mlp_only_layers": dense_layers,
          "decoder_sparse_step": step}
    c = families.model_config(hf, BASE)
    expected = [i not in dense_layers and (i + 1) % step == 0 for i in range(layers)]  # transformers' rule
    assert [c.is_moe_layer(i) for i in range(layers)] == expected
    assert (c.moe_first_layer, c.moe_every) == (first, every)
    assert c.scan_layers == (not c.mixed_layers)
    # Exported and read back: the same layers are MoE.
    back = families.model_config(families.hf_config(c, hf, "float32"), BASE)
    assert [back.is_moe_layer(i) for i in range(layers)] == expected


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_imported_logits_match_transformers(family, saved):
    directory = saved(family)
    _, config, params = import_model(directory)
    expected = hf_logits(directory, TOKENS)
    assert np.max(np.abs(jax_logits(config, params, TOKENS) - expected)) <= 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_round_trip_is_lossless_and_loads_in_transformers(family, saved, tmp_path):
    src = saved(family)
    hf, config, params = import_model(src)
    out = str(tmp_path / "out")
    export(params, config, hf, out)
    before, after = hf_tensors(src), hf_tensors(out)
    assert sorted(before) == sorted(after)  # the hub layout: one tensor per expert
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    _, config2, params2 = import_model(out)
    assert config2 == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    np.testing.assert_array_equal(hf_logits(out, TOKENS), hf_logits(src, TOKENS))


# Each case compiles a generator (~7-20 s on 2 cores): Qwen2-MoE (shared expert, no renormalisation) runs by
# default, the others in the slow pass.
@pytest.mark.parametrize("family", [f if f == "qwen2_moe" else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILY_NAMES])
def test_kv_cache_decoding_equals_transformers_greedy(family, saved):
    import torch
    import transformers

    from jaxlm.inference.generate import Generator, SamplingConfig

    directory = saved(family)
    _, config, params = import_model(directory)
    prompts = [TOKENS[0, :7].tolist(), TOKENS[1, :4].tolist()]  # different lengths: one is left-padded
    steps = Generator(Transformer(config, "xla"), params, SamplingConfig(max_new_tokens=6)).stream(prompts)
    ours = np.stack(list(steps), axis=1).tolist()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
    hf_model.generation_config.eos_token_id = None  # Mixtral's eos 2 would stop it; the Generator runs on
    with torch.no_grad():
        expected = [hf_model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                                      pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert ours == expected


def test_sharded_import_over_an_expert_axis(saved):
    """Each device reads only its block of the experts: the experts split over 'expert' (and 'fsdp')."""
    directory = saved("mixtral")  # 4 experts
    _, _, single = import_model(directory)
    mesh = make_mesh(MeshConfig(fsdp=2, expert=4))
    _, config, sharded = import_model(directory, mesh)
    gate = sharded["layers"]["moe"]["gate"]
    assert len(gate.sharding.device_set) == 8 and not gate.sharding.is_fully_replicated
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), single, sharded)


def test_fused_expert_tensors_import(saved, tmp_path):
    """transformers 5 holds each layer's experts stacked (experts.gate_up_proj, experts.down_proj); a
    checkpoint written from its state_dict imports to the same parameters as the hub layout."""
    import shutil

    from safetensors.torch import save_file

    directory = str(tmp_path / "fused")
    os.makedirs(directory)
    model = make_model("mixtral")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(saved("mixtral"), "config.json"), directory)
    _, _, fused = import_model(directory)
    _, _, split = import_model(saved("mixtral"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fused, split)


@pytest.mark.slow  # two CLI processes (~8 s); the round trip itself is checked by default above
def test_cli_round_trip_of_a_mixed_dense_moe_model(saved, tmp_path):
    src = str(tmp_path / "src")
    save_model("qwen3_moe", src)
    save_tokenizer(src)
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    assert cli.main(["convert", "from-hf", src, run, "model.dtype=float32", "model.attention=xla"]) == 0
    saved_model = json.load(open(os.path.join(run, "config.json")))["model"]
    assert saved_model["scan_layers"] is False and saved_model["moe_first_layer"] == 1
    assert cli.main(["convert", "to-hf", run, out, "--dtype", "float32"]) == 0
    before, after = hf_tensors(src), hf_tensors(out)
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)
    exported = json.load(open(os.path.join(out, "config.json")))
    assert exported["architectures"] == ["Qwen3MoeForCausalLM"] and exported["mlp_only_layers"] == [0]


def _one_line_error(call, pattern):
    with pytest.raises(ConfigError) as e:
        call()
    assert "\n" not in str(e.value) and re.search(pattern, str(e.value)), str(e.value)


def test_unsupported_router_and_layout_fields_are_named(saved, caplog):
    qwen = importer.read_config(saved("qwen3_moe"))
    mixtral = importer.read_config(saved("mixtral"))
    for hf, field, value in [(qwen, "scoring_func", "sigmoid"), (qwen, "topk_method", "noaux_tc"),
                             (mixtral, "n_group", 8), (qwen, "routed_scaling_factor", 2.5)]:
        _one_line_error(lambda: families.model_config({**hf, field: value}, BASE),
                        rf"config.json {field}={value!r} is not supported")
    # Layer 1 dense among MoE layers 0, 2, 3: no first-layer + every-k layout gives that.
    _one_line_error(lambda: families.model_config({**qwen, "num_hidden_layers": 4, "mlp_only_layers": [1]}, BASE),
                    r"config.json mlp_only_layers=\[1\] with decoder_sparse_step=1 is not supported")
    _one_line_error(lambda: families.model_config({**qwen, "mlp_only_layers": [0, 1, 2]}, BASE),
                    r"mlp_only_layers=\[0, 1, 2\] .* leaves no MoE layer")
    qwen2 = importer.read_config(saved("qwen2_moe"))
    _one_line_error(lambda: families.model_config({**qwen2, "shared_expert_intermediate_size": 0}, BASE),
                    r"shared_expert_intermediate_size=0 is not supported")
    _one_line_error(lambda: families.model_config({**qwen, "use_sliding_window": True}, BASE),
                    r"use_sliding_window=True is not supported")
    # Training-only router noise: imported, with a warning.
    with caplog.at_level(logging.WARNING, "jaxlm.hf.families"):
        assert families.model_config({**mixtral, "router_jitter_noise": 0.1}, BASE).num_experts == 4
    assert "router_jitter_noise=0.1 is ignored" in caplog.text


def test_models_without_a_hugging_face_moe_family_are_named():
    moe = dataclasses.replace(BASE, num_experts=4, experts_per_token=2, expert_mlp_dim=24)
    assert families.family_for(moe) == "mixtral"
    assert families.family_for(dataclasses.replace(moe, router="topk_softmax", norm_topk_prob=False)) == "mixtral"
    for changes, pattern in [
        (dict(norm_topk_prob=False), r"model.norm_topk_prob=false .* cannot be exported"),
        (dict(num_layers=4, moe_every=2, scan_layers=False), r"dense layers .* cannot be exported"),
        (dict(shared_expert_dim=16), r"shared expert without model.shared_expert_gate"),
        (dict(qkv_bias=True), r"qkv_bias and no shared expert"),
        (dict(qk_norm=True, shared_expert_dim=16, shared_expert_gate=True), r"qk_norm \(Qwen3-MoE\) and a shared"),
    ]:
        _one_line_error(lambda: families.family_for(dataclasses.replace(moe, **changes)), pattern)


def test_missing_expert_tensor_is_named(saved, tmp_path):
    from safetensors.numpy import load_file, save_file
    import shutil

    directory = str(tmp_path / "m")
    shutil.copytree(saved("mixtral"), directory)
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    tensors.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    save_file(tensors, path, metadata={"format": "pt"})
    _one_line_error(lambda: import_model(directory),
                    re.escape("missing tensors model.layers.1.block_sparse_moe.experts.3.w2.weight"))
