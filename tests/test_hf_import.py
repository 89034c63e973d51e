"""Hugging Face import: imported logits equal transformers' for every family; sharded import equals the
unsharded one; bad checkpoints get one clear error naming the problem."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from hf_models import FAMILIES, hf_logits, save_model  # noqa: E402
from jaxlm.core.config import ConfigError, MeshConfig, ModelConfig  # noqa: E402
from jaxlm.core.mesh import make_mesh  # noqa: E402
from jaxlm.hf import families, importer  # noqa: E402
from jaxlm.conversion import hf_runs  # noqa: E402
from jaxlm.model.transformer import Transformer  # noqa: E402
from jaxlm.training import base  # noqa: E402

BASE = ModelConfig(dtype="float32", attention="xla")
TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 12))


def import_model(directory: str, mesh, scan: bool = True):
    config = families.model_config(importer.read_config(directory), BASE)
    config = dataclasses.replace(config, scan_layers=scan)
    with jax.set_mesh(mesh):
        params = importer.load_params(directory, config, mesh, progress=False)
    return config, params


def one_device_mesh():
    return make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_imported_logits_match_transformers(family, tmp_path):
    directory = save_model(family, str(tmp_path / family))
    config, params = import_model(directory, one_device_mesh(), scan=family != "qwen3")
    logits = Transformer(config, "xla").apply({"params": params}, jnp.asarray(TOKENS))
    expected = hf_logits(directory, TOKENS)
    assert np.max(np.abs(np.asarray(logits) - expected)) <= 1e-4


def test_config_mapping_covers_the_features(tmp_path):
    cfgs = {f: families.model_config(importer.read_config(save_model(f, str(tmp_path / f))), BASE) for f in FAMILIES}
    assert cfgs["llama"].num_kv_heads == 2 and cfgs["llama"].rope_scaling_factor == 8.0
    assert cfgs["llama"].rope_original_max_len == 16 and cfgs["llama"].rope_theta == 500000.0
    assert cfgs["mistral"].sliding_window == 5 and cfgs["mistral"].num_kv_heads == 1
    assert cfgs["qwen2"].qkv_bias and cfgs["qwen2"].tie_embeddings
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].resolved_head_dim == 16
    assert cfgs["gpt2"].architecture == "gpt2" and cfgs["gpt2"].tie_embeddings


def test_sharded_import_equals_unsharded(tmp_path):
    directory = save_model("qwen2", str(tmp_path / "m"))
    _, single = import_model(directory, one_device_mesh())
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    config, sharded = import_model(directory, mesh)
    q = sharded["layers"]["attn"]["q"]
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), single, sharded)
    with jax.set_mesh(mesh):
        logits = jax.jit(Transformer(config, "xla").apply)({"params": sharded}, jnp.asarray(TOKENS))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(directory, TOKENS), atol=1e-4)


def test_sharded_checkpoint_with_index_and_bfloat16(tmp_path):
    import torch

    from hf_models import make_model

    model = make_model("llama").to(torch.bfloat16)
    directory = str(tmp_path / "m")
    model.save_pretrained(directory, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
    _, params = import_model(directory, one_device_mesh(), scan=False)
    expected = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["layers_1"]["mlp"]["down"]), expected)


def _edit(directory: str, change) -> None:
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case, message", [
    ("missing", "missing tensors model.layers.1.mlp.up_proj.weight"),
    ("extra", "unexpected tensors model.layers.0.mlp.extra.weight"),
    ("misshaped", "wrongly shaped tensors model.norm.weight [31] (expected [32])"),
])
def test_bad_checkpoint_names_the_tensor(case, message, tmp_path):
    directory = save_model("llama", str(tmp_path / "m"))
    if case == "missing":
        _edit(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "extra":
        _edit(directory, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    else:
        _edit(directory, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        import_model(directory, one_device_mesh())


def test_unsupported_architecture_and_fields_are_named(tmp_path):
    directory = save_model("llama", str(tmp_path / "m"))
    hf = importer.read_config(directory)
    with pytest.raises(ConfigError, match=r"architectures=\['FalconForCausalLM'\] is not supported"):
        families.model_config({**hf, "architectures": ["FalconForCausalLM"]})
    with pytest.raises(ConfigError, match="rope_type='yarn' is not supported"):
        families.model_config({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="attention_bias=True is not supported"):
        families.model_config({**hf, "attention_bias": True})
    with open(os.path.join(directory, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 64)
    with pytest.raises(ConfigError, match="is truncated"):
        import_model(directory, one_device_mesh())
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"]}, f)
    with pytest.raises(ConfigError, match="config.json has no 'num_attention_heads' field"):
        import_model(directory, one_device_mesh())


def test_gpt2_kv_cache_decoding_equals_transformers_greedy(tmp_path):
    import torch

    from hf_models import make_model
    from jaxlm.inference.generate import Generator, SamplingConfig

    directory = str(tmp_path / "gpt2")
    hf_model = make_model("gpt2")
    hf_model.save_pretrained(directory)
    config, params = import_model(directory, one_device_mesh())
    prompt = TOKENS[0, :7].tolist()
    steps = Generator(Transformer(config, "xla"), params, SamplingConfig(max_new_tokens=6)).stream([prompt])
    ours = [int(t[0]) for t in steps]
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                     pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == expected


def test_gpt2_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    """The original GPT-2 uploads: tensors named without `transformer.`, plus attn.bias mask buffers."""
    directory = save_model("gpt2", str(tmp_path / "m"))
    expected = hf_logits(directory, TOKENS)

    def strip(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)

    _edit(directory, strip)
    config, params = import_model(directory, one_device_mesh())
    logits = Transformer(config, "xla").apply({"params": params}, jnp.asarray(TOKENS))
    assert np.max(np.abs(np.asarray(logits) - expected)) <= 1e-4


def test_imported_compute_dtype_is_float32_on_cpu_unless_chosen(tmp_path, caplog):
    import logging

    import torch

    from hf_models import make_model, save_tokenizer
    from jaxlm.core import overrides
    from jaxlm.core.config import is_default

    directory = str(tmp_path / "bf16")
    make_model("llama").to(torch.bfloat16).save_pretrained(directory)
    save_tokenizer(directory)
    hf = importer.read_config(directory)
    assert (hf.get("dtype") or hf.get("torch_dtype")) == "bfloat16"
    assert is_default(ModelConfig().dtype)

    # Left alone (a preset or the command line not naming it): float32 on CPU, and the choice is logged.
    with caplog.at_level(logging.INFO, "jaxlm.hf.families"):
        config = base.resolve(overrides.load([f"model.init_from=hf:{directory}", "train.seq_len=32"]))
    assert jax.default_backend() == "cpu" and config.model.dtype == "float32"
    assert "compute dtype float32 (CPU; the checkpoint is bfloat16)" in caplog.text
    assert hf_runs.from_hf(directory, str(tmp_path / "run")).model.dtype == "float32"
    # On an accelerator: the checkpoint's own dtype (float16 has no jaxlm compute path: bfloat16).
    for stored, expected in (("bfloat16", "bfloat16"), ("float32", "float32"), ("float16", "bfloat16")):
        assert families.compute_dtype({**hf, "dtype": stored}, ModelConfig(), platform="gpu") == expected
    assert families.compute_dtype({"torch_dtype": "float32"}, ModelConfig(), platform="tpu") == "float32"

    # Chosen on the command line, even as the value the default has: the choice wins.
    chosen = overrides.load([f"model.init_from=hf:{directory}", "train.seq_len=32", "model.dtype=bfloat16"])
    assert base.resolve(chosen).model.dtype == "bfloat16"
    # A run's saved config.json holds the resolved dtype as a choice: a rerun keeps it.
    saved = overrides.load([str(tmp_path / "run" / "config.json")])
    assert not is_default(saved.model.dtype) and saved.model.dtype == "float32"


SAFE_PLATFORM = """
from jax._src import xla_bridge
from jaxlm.core.config import DistributedConfig
from jaxlm.hf.families import safe_platform
multi = DistributedConfig(coordinator_address="localhost:1", num_processes=2, process_id=0)
print(safe_platform(multi), xla_bridge.backends_are_initialized(), safe_platform(), xla_bridge.backends_are_initialized())
"""


def test_platform_query_does_not_start_a_backend_before_a_multi_process_start():
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SAFE_PLATFORM], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["cpu", "False", "cpu", "True"], proc.stderr
