"""ONNX export (`jaxlm export onnx`): onnxruntime's logits equal jaxlm's within 1e-4 in float32, for the full
forward pass and for a cached prefill and step, a greedy loop in onnxruntime gives jaxlm's greedy tokens, and a
run that cannot be exported fails with one line. Two imported families: Qwen2 with scanned layers (tied
embeddings, q/k/v biases) and GPT-2 with unrolled ones (LayerNorm, GELU, learned positions)."""

import json
import os
import sys

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")
pytest.importorskip("transformers")

import jax  # noqa: E402

from conftest import quick_jit  # noqa: E402
from hf_models import save_model, save_tokenizer  # noqa: E402
from jaxlm import cli  # noqa: E402
from jaxlm.conversion import onnx_export  # noqa: E402
from jaxlm.core.config import SamplingConfig  # noqa: E402
from jaxlm.inference.generate import Generator  # noqa: E402
from jaxlm.inference.load import load_run  # noqa: E402

FAMILIES = {"qwen2": [], "gpt2": ["model.scan_layers=False"]}
TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (the loaded run, its ONNX directory), exported through the CLI. The run's params are fetched
    to one device: the references then compile once, for it."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for family, overrides in FAMILIES.items():
        src, run, onnx_dir = (str(root / f"{family}_{x}") for x in ("src", "run", "onnx"))
        save_model(family, src)
        save_tokenizer(src)
        argv = ["convert", "from-hf", src, run, "model.dtype=float32", "model.attention=xla", *overrides]
        assert cli.main(argv) == 0
        assert cli.main(["export", "onnx", run, onnx_dir]) == 0
        loaded = load_run(run)
        loaded.params, loaded.mesh = jax.device_get(loaded.params), None
        out[family] = loaded, onnx_dir
    return out


def _session(onnx_dir, name):
    return ort.InferenceSession(os.path.join(onnx_dir, name), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_forward_logits_match(exported, family):
    run, onnx_dir = exported[family]
    session = _session(onnx_dir, onnx_export.FULL)
    for shape in ((2, 9), (1, 17)):  # dynamic batch and length
        tokens = np.random.default_rng(shape[1]).integers(0, run.model.config.vocab_size, shape).astype(np.int32)
        want = np.asarray(quick_jit(run.model.apply, {"params": run.params}, tokens)({"params": run.params}, tokens))
        got = session.run(None, {"input_ids": tokens})[0]
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefill_and_step_match(exported, family):
    """A left-padded batch (one pad slot in row 0), prefilled and then stepped once, against jaxlm's cached
    forward pass on the same inputs; the caches returned agree too."""
    run, onnx_dir = exported[family]
    c = run.model.config
    session = _session(onnx_dir, onnx_export.STEP)
    b, p, total = 2, 6, 10
    tokens = np.random.default_rng(3).integers(0, c.vocab_size, (b, p)).astype(np.int32)
    pad = np.array([1, 0])
    positions = np.maximum(np.arange(p)[None] - pad[:, None], 0).astype(np.int32)
    cache = np.zeros((c.num_layers, b, total, c.num_kv_heads, c.resolved_head_dim), np.float32)
    slots = np.arange(total)[None]
    feed = {"input_ids": tokens, "position_ids": positions, "past_key": cache, "past_value": cache,
            "slot": np.array(0, np.int32), "valid": (slots >= pad[:, None]) & (slots < p)}
    for _ in range(2):
        got = session.run(None, feed)
        args = ({"params": run.params}, feed["input_ids"], feed["position_ids"], np.ones_like(feed["input_ids"]),
                {"k": feed["past_key"], "v": feed["past_value"]}, {"slot": feed["slot"], "valid": feed["valid"]})
        want_logits, want_cache = quick_jit(run.model.apply, *args)(*args)
        for g, w in zip(got, (want_logits, want_cache["k"], want_cache["v"])):
            np.testing.assert_allclose(g, np.asarray(w), atol=TOL, rtol=0)
        slot = int(feed["slot"]) + feed["input_ids"].shape[1]  # then one token per row at the next slot
        feed.update(input_ids=got[0][:, -1].argmax(-1).astype(np.int32)[:, None],
                    position_ids=(slot - pad)[:, None].astype(np.int32), past_key=got[1], past_value=got[2],
                    slot=np.array(slot, np.int32), valid=feed["valid"] | (slots == slot))


def test_onnx_greedy_loop_gives_jaxlm_tokens(exported):
    """One family: the loop does not depend on it, and the cached step's logits are checked for both above."""
    run, onnx_dir = exported["qwen2"]
    prompt, new = [5, 11, 7, 30, 12], 10
    generator = Generator(run.model, run.params, SamplingConfig(temperature=0.0, max_new_tokens=new), run.mesh)
    want = [int(t[0]) for t in generator.stream([prompt])]
    eos = run.tokenizer.eos_id()
    want = want[:want.index(eos)] if eos in want else want  # greedy() ends before EOS
    assert onnx_export.greedy(onnx_dir, prompt, new) == want


def test_directory_holds_tokenizer_and_config(exported):
    run, onnx_dir = exported["qwen2"]
    files = set(os.listdir(onnx_dir))
    assert {"model.onnx", "model.onnx.data", "decoder_with_past.onnx", "decoder_with_past.onnx.data",
            "onnx_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    with open(os.path.join(onnx_dir, "tokenizer.json"), "rb") as f:
        with open(os.path.join(run.directory, "tokenizer.json"), "rb") as g:
            assert f.read() == g.read()
    with open(os.path.join(onnx_dir, onnx_export.CONFIG)) as f:
        config = json.load(f)
    assert config["eos_id"] == run.tokenizer.eos_id() and config["num_layers"] == run.model.config.num_layers
    assert config["graphs"][onnx_export.STEP]["inputs"]["past_key"]["shape"] == [2, "batch", "cache", 2, 8]
    described = config["graphs"][onnx_export.STEP]["inputs"].values()
    session = _session(onnx_dir, onnx_export.STEP)  # the graph's own dims are the ones described
    assert [i.shape for i in session.get_inputs()] == [v["shape"] for v in described]


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxlm: error: ") and err.count("\n") == 1, err
    return err


def test_unexportable_runs_fail_with_one_line(exported, tmp_path, capsys, monkeypatch):
    run, _ = exported["qwen2"]
    export = lambda run_dir, out, *flags: _one_line_error(capsys, ["export", "onnx", str(run_dir), str(out), *flags])
    # A mixture-of-experts run: refused from its config.json, before its checkpoint is read.
    moe = tmp_path / "moe"
    moe.mkdir()
    with open(os.path.join(run.directory, "config.json")) as f:
        config = json.load(f)
    config["model"].update(num_experts=4, expert_mlp_dim=24)
    (moe / "config.json").write_text(json.dumps(config))
    assert "mixture-of-experts" in export(moe, tmp_path / "o1")
    assert not os.path.exists(tmp_path / "o1")
    assert "not a jaxlm run directory" in export(tmp_path, tmp_path / "o2")
    assert "no checkpoint for step 7" in export(run.directory, tmp_path / "o3", "--step", "7")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "not empty" in export(run.directory, tmp_path / "full")
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # the onnx extra not installed
    assert "pip install 'jaxlm[onnx]'" in export(run.directory, tmp_path / "o4")
