"""Hugging Face sequence classifiers (reward models): *ForSequenceClassification imports with its `score` head
and scores as transformers does at each row's last token; export is bit-exact and loads in transformers;
`jaxlm convert` round-trips a reward model's run; unsupported classifiers get one clear error."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from hf_models import hf_tensors, save_model, save_tokenizer  # noqa: E402
from jaxlm import cli  # noqa: E402
from jaxlm.core import rundir  # noqa: E402
from jaxlm.core.config import ConfigError, MeshConfig, ModelConfig  # noqa: E402
from jaxlm.core.mesh import make_mesh  # noqa: E402
from jaxlm.conversion import hf_runs  # noqa: E402
from jaxlm.hf import exporter, families, importer  # noqa: E402
from jaxlm.model.transformer import Transformer  # noqa: E402

BASE = ModelConfig(dtype="float32", attention="xla")
VOCAB, PAD = 97, 96  # the pad id is the last one; the rows below never hold it
# Odd shapes: 3 heads of 8 over one KV head, 3 layers, a vocabulary of 97.
SHAPE = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
             num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-6)
CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}
TOKENS = np.random.default_rng(2).integers(1, PAD, size=(3, 11))


def make_classifier(family: str, num_labels: int, seed: int = 0, **config):
    """A random float32 *ForSequenceClassification with non-trivial norms and biases (Qwen2: q/k/v biases)."""
    import torch
    import transformers

    config = getattr(transformers, CONFIGS[family])(**{**SHAPE, "num_labels": num_labels, **config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    with torch.no_grad():  # their defaults are ones and zeros; the score head gets a visible scale
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name == "score.weight":
                p.normal_(0.0, 0.5)
    return model


def hf_scores(directory_or_model, tokens: np.ndarray) -> np.ndarray:
    """transformers' pooled logits (B, num_labels): each row's score at its last non-pad token."""
    import torch
    import transformers

    model = directory_or_model
    if isinstance(model, str):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            model, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def import_model(directory: str, scan: bool = True):
    config = dataclasses.replace(families.model_config(importer.read_config(directory), BASE), scan_layers=scan)
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        return config, importer.load_params(directory, config, mesh, progress=False)


def jaxlm_scores(config, params, tokens: np.ndarray, pad: int = PAD) -> np.ndarray:
    """The score at each row's last non-pad token (rows right-padded with `pad`), padding masked out as
    jaxlm's reward training feeds it."""
    real = tokens != pad
    lengths = real.sum(axis=1)
    positions = np.where(real, np.arange(tokens.shape[1]), 0)
    logits = Transformer(config, "xla").apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                                              jnp.asarray(real.astype(np.int32)))
    assert logits.shape == (*tokens.shape, config.num_labels) and logits.dtype == jnp.float32
    return np.asarray(logits)[np.arange(len(tokens)), lengths - 1]


def export(params, config, template: dict, out: str, tokens: dict | None = None) -> dict:
    os.makedirs(out)
    exporter.write_checkpoint(params, config, out, "float32", progress=False)
    hf = families.hf_config(config, template, "float32", tokens)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f)
    return hf


@pytest.mark.parametrize("family, num_labels, scan", [
    ("llama", 1, True), ("qwen2", 1, False), ("llama", 3, True), ("qwen3", 1, True),
])
def test_classifier_scores_and_round_trip_match_transformers(family, num_labels, scan, tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    hf_model = make_classifier(family, num_labels, pad_token_id=PAD, tie_word_embeddings=family == "qwen2")
    hf_model.save_pretrained(src)
    config, params = import_model(src, scan)
    assert config.num_labels == num_labels and config.qkv_bias == (family == "qwen2")
    assert "lm_head" not in params and params["score"].shape == (num_labels, 24)

    # Equal-length rows, then one right-padded row, which transformers pools at its last non-pad token.
    padded = TOKENS.copy()
    padded[1, 7:] = PAD
    for tokens in (TOKENS, padded):
        expected = hf_scores(hf_model, tokens)
        diff = float(np.max(np.abs(jaxlm_scores(config, params, tokens) - expected)))
        print(f"{family} num_labels={num_labels}: max |jaxlm - transformers| = {diff:.2e}")
        assert diff <= 1e-4

    hf = export(params, config, importer.read_config(src), out)
    assert hf["architectures"] == [families.FAMILY_CLASSIFIER[family]] and hf["pad_token_id"] == PAD
    assert hf["id2label"] == {str(i): f"LABEL_{i}" for i in range(num_labels)}
    before, after = hf_tensors(src), hf_tensors(out)
    assert sorted(before) == sorted(after) and "score.weight" in after and "lm_head.weight" not in after
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    # The same tensors; torch's CPU kernels may still round a last bit differently as the file's layout
    # places them at other alignments.
    np.testing.assert_allclose(hf_scores(out, padded), hf_scores(src, padded), rtol=0, atol=1e-6)


def test_labels_and_pad_id_in_the_exported_config(tmp_path):
    src = str(tmp_path / "src")
    make_classifier("llama", 2, id2label={0: "bad", 1: "good"}).save_pretrained(src)  # pad_token_id: None
    hf = importer.read_config(src)
    assert hf.get("pad_token_id") is None and families.num_labels(hf) == 2
    c = families.model_config(hf, BASE)
    # The template's label names where they fit; the pad id: the tokenizer's, else eos, else 0.
    out = families.hf_config(c, hf, "float32", {"pad_token_id": 5})
    assert out["id2label"] == {"0": "bad", "1": "good"} and out["label2id"] == {"bad": 0, "good": 1}
    assert out["pad_token_id"] == 5
    assert families.hf_config(c, {**hf, "eos_token_id": [7, 8]}, "float32")["pad_token_id"] == 7
    assert families.hf_config(c, {**hf, "eos_token_id": None}, "float32")["pad_token_id"] == 0
    assert families.hf_config(c, {**hf, "pad_token_id": 3}, "float32", {"pad_token_id": 5})["pad_token_id"] == 3
    # A head of another size: default names. From a language model's config: a classifier's architecture.
    three = families.hf_config(dataclasses.replace(c, num_labels=3), hf, "float32")
    assert three["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    causal = {**hf, "architectures": ["LlamaForCausalLM"]}
    del causal["id2label"], causal["label2id"]
    assert families.hf_config(c, causal, "float32")["architectures"] == ["LlamaForSequenceClassification"]
    # transformers leaves out id2label at its default of 2 labels; older writers say num_labels.
    assert families.num_labels({"architectures": ["Qwen2ForSequenceClassification"]}) == 2
    assert families.num_labels({"architectures": ["Qwen2ForSequenceClassification"], "num_labels": 1}) == 1
    # A language model has no labels, whatever it writes or the base says.
    assert families.model_config(causal, dataclasses.replace(BASE, num_labels=1)).num_labels == 0
    assert families.num_labels({**causal, "id2label": {"0": "a"}}) == 0


def test_language_model_import_is_unchanged(tmp_path):
    directory = save_model("qwen2", str(tmp_path / "lm"))
    config, params = import_model(directory)
    assert config.num_labels == 0 and "score" not in params and config.tie_embeddings


def test_unsupported_classifiers_are_named(tmp_path):
    src = str(tmp_path / "src")
    make_classifier("llama", 1).save_pretrained(src)
    hf = importer.read_config(src)
    for arch in ("GPT2ForSequenceClassification", "MixtralForSequenceClassification",
                 "Qwen3MoeForSequenceClassification"):
        with pytest.raises(ConfigError, match=rf"architectures=\['{arch}'\] is not supported; jaxlm imports the "
                                              rf"sequence classifiers LlamaForSequenceClassification"):
            families.model_config({**hf, "architectures": [arch]})
    with pytest.raises(ConfigError, match=r"a GPT-2 model with model.num_labels=1 has no supported"):
        families.hf_config(ModelConfig(architecture="gpt2", num_labels=1), None, "float32")
    moe = ModelConfig(num_experts=4, experts_per_token=2, num_labels=1)
    with pytest.raises(ConfigError, match=r"a mixture-of-experts model with model.num_labels=1 has no supported"):
        families.tensor_maps(moe)


def test_reward_run_converts_both_ways(tmp_path, capsys):
    """`jaxlm convert from-hf` makes a task=reward run of a reward model; `to-hf` writes it back bit-exactly,
    with the run tokenizer's pad id where the source config named none."""
    src, run, out = str(tmp_path / "src"), str(tmp_path / "run"), str(tmp_path / "out")
    hf_model = make_classifier("qwen2", 1)  # pad_token_id None: transformers scores one row at a time
    hf_model.save_pretrained(src)
    save_tokenizer(src, vocab_size=VOCAB)  # its pad token <|endoftext|> is id 0
    assert cli.main(["convert", "from-hf", src, run, "model.dtype=float32", "model.attention=xla"]) == 0
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["task"] == "reward" and saved["model"]["num_labels"] == 1
    assert cli.main(["convert", "to-hf", run, out, "--dtype", "float32"]) == 0
    capsys.readouterr()
    before, after = hf_tensors(src), hf_tensors(out)
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["architectures"] == ["Qwen2ForSequenceClassification"] and hf["pad_token_id"] == 0
    expected = np.concatenate([hf_scores(hf_model, row[None]) for row in TOKENS])
    np.testing.assert_allclose(hf_scores(out, TOKENS), expected, rtol=0, atol=1e-6)  # pad 0: one batch
    # A run with no Hugging Face config to follow (as one jaxlm trained from scratch): the same classifier.
    os.remove(os.path.join(run, rundir.HF_CONFIG))
    assert cli.main(["convert", "to-hf", run, str(tmp_path / "out2")]) == 0
    hf = json.load(open(tmp_path / "out2" / "config.json"))
    assert hf["architectures"] == ["Qwen2ForSequenceClassification"] and hf["pad_token_id"] == 0
    np.testing.assert_allclose(hf_scores(str(tmp_path / "out2"), TOKENS), expected, rtol=0, atol=1e-6)

    # A classifier of several labels has no jaxlm task: one line, and no run directory.
    three = str(tmp_path / "three")
    make_classifier("llama", 3).save_pretrained(three)
    with pytest.raises(ConfigError, match="is a sequence classifier with 3 labels, which no jaxlm task"):
        hf_runs.from_hf(three, str(tmp_path / "run3"))
    assert not os.path.exists(tmp_path / "run3")
