"""PEFT compatibility: jaxlm LoRA adapters load in `peft` with the same logits, and PEFT adapters import."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("peft")

from hf_models import save_model  # noqa: E402
from jaxlm.core import sharded_init  # noqa: E402
from jaxlm.core.config import Config, ConfigError, LoraConfig, MeshConfig, ModelConfig  # noqa: E402
from jaxlm.core.mesh import make_mesh  # noqa: E402
from jaxlm.hf import families, importer  # noqa: E402
from jaxlm.hf import peft as peft_lib  # noqa: E402
from jaxlm.model import lora as lora_lib  # noqa: E402
from jaxlm.model.transformer import Transformer  # noqa: E402
from jaxlm.training import base as training_base  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 12))


def _import(directory, scan=True):
    config = dataclasses.replace(families.model_config(importer.read_config(directory),
                                                       ModelConfig(dtype="float32", attention="xla")), scan_layers=scan)
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        params = importer.load_params(directory, config, mesh, progress=False)
    return config, params


def _lora(config, lora_config):
    model = Transformer(config, "xla")
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return lora_lib.Lora(model, lora_config, boxed)


def _peft_logits(hf_dir, adapter_dir):
    import torch
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.as_tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_exported_adapter_gives_jaxlm_logits_in_peft_and_imports_back(scan, tmp_path):
    hf_dir = save_model("llama", str(tmp_path / "hf"))
    config, params = _import(hf_dir, scan)
    lo = _lora(config, LoraConfig(targets=("attn/(q|k|v|o)$", "mlp/(gate|up|down)$"), rank=4, alpha=8.0))
    adapters = sharded_init.strip_boxes(lo.init(jax.random.key(1)))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    adapters = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    want = np.asarray(jax.jit(lo.apply)({"params": {"base": params, "lora": adapters}}, jnp.asarray(TOKENS)))

    out = peft_lib.export(jax.device_get(adapters), lo.config, config, str(tmp_path / "adapter"), base_model=hf_dir)
    got = _peft_logits(hf_dir, out)
    assert np.max(np.abs(got - want)) <= 1e-4
    base_logits = jax.jit(Transformer(config, "xla").apply)({"params": params}, jnp.asarray(TOKENS))
    assert np.max(np.abs(want - np.asarray(base_logits))) > 1e-2  # the adapters matter

    imported_config, imported = peft_lib.import_adapters(out, config)
    assert (imported_config.rank, imported_config.alpha) == (4, 8.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), imported, jax.device_get(adapters))
    with pytest.raises(ConfigError, match="not empty"):
        peft_lib.export(jax.device_get(adapters), lo.config, config, out)


def test_adapter_made_by_peft_imports_with_the_same_logits(tmp_path):
    import torch
    import transformers
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    hf_dir = save_model("llama", str(tmp_path / "hf"))
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    torch.manual_seed(0)
    # Random A and B (not PEFT's zero B), rsLoRA scaling, and only some modules of only the second layer.
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=16, init_lora_weights=False, use_rslora=True,
                                                     target_modules=["q_proj", "v_proj", "down_proj"],
                                                     layers_to_transform=[1]))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    want = _peft_logits(hf_dir, str(tmp_path / "adapter"))

    config, params = _import(hf_dir)
    lora_config, adapters = peft_lib.import_adapters(str(tmp_path / "adapter"), config)
    lo = _lora(config, lora_config)
    got = np.asarray(jax.jit(lo.apply)({"params": {"base": params, "lora": adapters}}, jnp.asarray(TOKENS)))
    assert np.max(np.abs(got - want)) <= 1e-4
    np.testing.assert_array_equal(adapters["layers"]["attn"]["q"]["b"][0], 0)  # layer 0 untouched

    # Continuing from it (model.init_from=ADAPTER_DIR, on the base PEFT recorded): the same model, and layer 0's
    # adapters can train (A is not zero).
    run_config = Config(model=dataclasses.replace(config, init_from=str(tmp_path / "adapter")))
    assert training_base.parse(run_config.model.init_from) == training_base.Start(f"hf:{hf_dir}", str(tmp_path / "adapter"))
    start = training_base.initial_adapters(run_config, lo)
    got = np.asarray(jax.jit(lo.apply)({"params": {"base": params, "lora": start}}, jnp.asarray(TOKENS)))
    assert np.max(np.abs(got - want)) <= 1e-4
    q = start["layers"]["attn"]["q"]
    assert np.all(np.abs(q["a"][0]).max(axis=0) > 0) and not np.any(q["b"][0])  # every rank component
    np.testing.assert_array_equal(q["a"][1], adapters["layers"]["attn"]["q"]["a"][1])


def test_peft_import_makes_a_run_with_the_adapter_merged(tmp_path):
    """`jaxlm peft import ADAPTER BASE_RUN OUT`: a run whose merged model gives peft's logits, written whole."""
    import torch
    import transformers
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from hf_models import save_tokenizer
    from jaxlm import cli
    from jaxlm.inference.load import load_run

    hf_dir = save_model("llama", str(tmp_path / "hf"))
    save_tokenizer(hf_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                     target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert cli.main(["convert", "from-hf", hf_dir, str(tmp_path / "base_run")]) == 0
    assert cli.main(["peft", "import", str(tmp_path / "adapter"), str(tmp_path / "base_run"), str(tmp_path / "out")]) == 0
    run = load_run(str(tmp_path / "out"))
    got = np.asarray(jax.jit(run.model.apply)({"params": run.params}, jnp.asarray(TOKENS)))
    assert np.max(np.abs(got - _peft_logits(hf_dir, str(tmp_path / "adapter")))) <= 1e-4
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]
    # An output directory that is not empty is refused before anything is read or written.
    assert cli.main(["peft", "import", str(tmp_path / "adapter"), str(tmp_path / "base_run"), str(tmp_path / "out")]) == 2


@pytest.mark.slow  # the whole chain through the CLI: about a minute on 2 cores
def test_finetune_from_hf_then_peft_export_and_merged_export_match(tmp_path, capsys):
    """HF model -> `jaxlm finetune model.init_from=hf:DIR` (LoRA SFT) -> `jaxlm peft export` loads in peft, and
    `jaxlm convert to-hf` of the merged run loads in transformers, both with the finetuned run's logits."""
    import json

    from hf_models import WORDS, hf_logits, save_tokenizer
    from jaxlm import cli
    from jaxlm.inference.load import load_run

    hf_dir = save_model("llama", str(tmp_path / "hf"))
    save_tokenizer(hf_dir)
    rng = np.random.default_rng(0)
    with open(tmp_path / "chats.jsonl", "w") as f:
        for _ in range(40):
            words = rng.choice(WORDS, size=6).tolist()
            f.write(json.dumps({"prompt": " ".join(words[:3]), "response": " ".join(words[3:])}) + "\n")
    run = tmp_path / "run"
    argv = ["finetune", "sft_tiny", f"model.init_from=hf:{hf_dir}", f"finetune.data={tmp_path}/chats.jsonl",
            f"train.run_dir={run}", "train.steps=6", "train.seq_len=32", "train.progress=False",
            "model.dtype=float32", "optim.lr=2e-2", "optim.warmup_steps=1", "lora.rank=4",
            "lora.targets=('attn/(q|k|v|o)$','mlp/(gate|up|down)$')"]
    assert cli.main(argv) == 0
    assert cli.main(["peft", "export", str(run), str(tmp_path / "adapter"), "--base-model", hf_dir]) == 0
    assert cli.main(["convert", "to-hf", str(run), str(tmp_path / "merged_hf")]) == 0
    finetuned = load_run(str(run))
    want = np.asarray(jax.jit(finetuned.model.apply)({"params": finetuned.params}, jnp.asarray(TOKENS)))
    base_logits = hf_logits(hf_dir, TOKENS)
    assert np.max(np.abs(want - base_logits)) > 1e-3  # finetuning changed the model
    assert np.max(np.abs(_peft_logits(hf_dir, str(tmp_path / "adapter")) - want)) <= 1e-4
    assert np.max(np.abs(hf_logits(str(tmp_path / "merged_hf"), TOKENS) - want)) <= 1e-4
