"""Hugging Face export: HF -> jaxlm -> HF is lossless, transformers loads the export as-is (float32,
bfloat16, sharded with an index), the CLI round trip keeps tokenizer and chat template, and runs trained by
`jaxlm train` (from scratch or from model.init_from=hf:DIR) export with the same logits."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from hf_models import hf_logits, hf_tensors, make_model, save_model, save_tokenizer  # noqa: E402
from jaxlm import cli  # noqa: E402
from jaxlm.core.config import ConfigError, MeshConfig, ModelConfig  # noqa: E402
from jaxlm.conversion import hf_runs  # noqa: E402
from jaxlm.core.mesh import make_mesh  # noqa: E402
from jaxlm.hf import exporter, families, importer  # noqa: E402
from jaxlm.hf.tokenizer import chat_template  # noqa: E402
from jaxlm.model.transformer import Transformer  # noqa: E402

BASE = ModelConfig(dtype="float32", attention="xla")
TOKENS = np.random.default_rng(1).integers(0, 96, size=(2, 10))


def _import(directory, mesh, scan=True):
    hf = importer.read_config(directory)
    config = dataclasses.replace(families.model_config(hf, BASE), scan_layers=scan)
    with jax.set_mesh(mesh):
        return hf, config, importer.load_params(directory, config, mesh, progress=False)


def _export(params, config, template, out, dtype="float32", max_shard_bytes=5 << 30):
    os.makedirs(out)
    exporter.write_checkpoint(params, config, out, dtype, max_shard_bytes, progress=False)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(families.hf_config(config, template, dtype), f)


@pytest.mark.parametrize("family, mesh_shape, scan", [
    ("qwen2", dict(fsdp=1), True), ("gpt2", dict(fsdp=1), False), ("llama", dict(fsdp=2, tensor=4), True),
])
def test_round_trip_is_lossless(family, mesh_shape, scan, tmp_path):
    src = save_model(family, str(tmp_path / "src"))
    devices = jax.devices()[: int(np.prod(list(mesh_shape.values())))]
    hf, config, params = _import(src, make_mesh(MeshConfig(**mesh_shape), devices), scan)
    _export(params, config, hf, str(tmp_path / "out"))
    before, after = hf_tensors(src), hf_tensors(str(tmp_path / "out"))
    assert sorted(before) == sorted(after)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    np.testing.assert_array_equal(hf_logits(str(tmp_path / "out"), TOKENS), hf_logits(src, TOKENS))


def test_bfloat16_and_sharded_exports_load_in_transformers(tmp_path):
    import torch

    src = save_model("qwen3", str(tmp_path / "src"))
    hf, config, params = _import(src, make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]))
    _export(params, config, hf, str(tmp_path / "bf16"), dtype="bfloat16", max_shard_bytes=16 << 10)
    assert os.path.isfile(str(tmp_path / "bf16" / "model.safetensors.index.json"))
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert loaded.dtype == torch.bfloat16
    reference = make_model("qwen3").to(torch.bfloat16).state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_cli_round_trip_keeps_tokenizer_and_chat_template(tmp_path, capsys):
    src = save_model("qwen2", str(tmp_path / "src"))
    save_tokenizer(src)
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    assert cli.main(["convert", "from-hf", src, run, "model.dtype=float32", "model.attention=xla"]) == 0
    assert cli.main(["generate", run, "--prompt", "in the beginning", "--max-new-tokens", "3"]) == 0
    assert cli.main(["convert", "to-hf", run, out, "--dtype", "float32"]) == 0
    assert "Hugging Face checkpoint" in capsys.readouterr().out
    before, after = hf_tensors(src), hf_tensors(out)
    assert all(np.array_equal(before[k], after[k]) for k in before) and sorted(before) == sorted(after)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(src, name), "rb").read() == open(os.path.join(out, name), "rb").read()
    import transformers

    assert chat_template(run) == json.load(open(os.path.join(src, "tokenizer_config.json")))["chat_template"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "let there be light"}], tokenize=False)
    assert text == "<|im_start|>user\nlet there be light<|im_end|>\n"
    np.testing.assert_allclose(hf_logits(out, TOKENS), hf_logits(src, TOKENS), atol=0)
    # Bad CLI input: one line, exit 2.
    assert cli.main(["convert", "to-hf", run, out]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert cli.main(["convert", "from-hf", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "is not a Hugging Face checkpoint (no config.json)" in capsys.readouterr().err


def _small_train_overrides(run_dir: str) -> list[str]:
    return [f"train.run_dir={run_dir!r}", "train.steps=2", "train.batch_size=8", "train.seq_len=16",
            "train.eval_batches=0", "train.progress=False", "model.dtype='float32'", "model.attention='xla'",
            "checkpoint.async_save=False", "data.eval_fraction=0.0", "mesh.fsdp=-1"]


@pytest.mark.slow
def test_init_from_hf_trains_and_exports_with_same_logits(tmp_path):
    from jaxlm.core import overrides
    from jaxlm.training import pretrain as train

    src = save_model("llama", str(tmp_path / "src"))
    save_tokenizer(src)
    run_dir = str(tmp_path / "run")
    # optim.lr must be > 0; 1e-30 moves no float32 weight of the checkpoint (all far above 1e-23).
    config = overrides.load(["tiny", f"model.init_from='hf:{src}'", "optim.lr=1e-30", *_small_train_overrides(run_dir)])
    train.train(config)
    saved = json.load(open(os.path.join(run_dir, "config.json")))["model"]
    assert saved["d_model"] == 32 and saved["rope_scaling_factor"] == 8.0 and saved["init_from"] == f"hf:{src}"
    out = str(tmp_path / "out")
    assert cli.main(["convert", "to-hf", run_dir, out]) == 0
    before, after = hf_tensors(src), hf_tensors(out)  # lr~0: the trained run still holds the imported weights
    assert all(np.array_equal(before[k], after[k]) for k in before) and sorted(before) == sorted(after)


@pytest.mark.slow
def test_pretrained_run_exports_to_transformers(tmp_path):
    from jaxlm.core import overrides
    from jaxlm.inference.load import load_run
    from jaxlm.training import pretrain as train

    run_dir = str(tmp_path / "run")
    config = overrides.load(["tiny", "model.num_layers=2", "model.d_model=64", "model.mlp_dim=128",
                             "model.num_heads=4", "model.num_kv_heads=2", *_small_train_overrides(run_dir)])
    train.train(config)
    out = str(tmp_path / "out")
    assert cli.main(["convert", "to-hf", run_dir, out, "--dtype", "float32"]) == 0
    run = load_run(run_dir)
    tokens = np.asarray([[run.tokenizer.bos_id(), *run.tokenizer.encode("In the beginning God created")]])
    logits = Transformer(run.config.model, "xla").apply({"params": run.params}, jnp.asarray(tokens))
    np.testing.assert_allclose(hf_logits(out, tokens), np.asarray(logits), atol=1e-4)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("In the beginning God created").input_ids == tokens[0].tolist()


def test_export_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ConfigError, match="--dtype float16 is not supported"):
        hf_runs.to_hf(str(tmp_path), str(tmp_path / "out"), "float16")


@pytest.mark.slow
def test_converted_run_resumes_training_from_the_imported_weights(tmp_path):
    from jaxlm.core import overrides
    from jaxlm.inference.load import load_run
    from jaxlm.training import pretrain as train

    src = save_model("qwen2", str(tmp_path / "src"))
    save_tokenizer(src)
    run_dir = str(tmp_path / "run")
    assert cli.main(["convert", "from-hf", src, run_dir, *_small_train_overrides(run_dir)]) == 0
    imported = load_run(run_dir).params
    summary = train.train(overrides.load([os.path.join(run_dir, "config.json")]))
    assert summary.step == 2 and np.isfinite(summary.metrics["loss"])
    trained = load_run(run_dir).params
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["0", "2"]
    delta = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), imported, trained)
    assert 0 < max(jax.tree.leaves(delta)) < 0.1  # two small steps from the imported weights, not from scratch
