"""Sequence-to-sequence data: {"input", "target"} rows packed into pairs of encoder and decoder rows, each
example on both sides under one segment id, bad rows counted."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.data import packing
from jaxlm.training import seq2seq, sft

EOS = 3


def _encode(text):
    return [4 + (ord(c) % 90) for c in text]


def test_pairs_pack_with_matching_segments_and_shifted_targets():
    rng = np.random.default_rng(0)
    rows = [(f"r{i}", {"input": "x" * int(rng.integers(1, 30)), "target": "y" * int(rng.integers(1, 12))})
            for i in range(60)]
    rows += [("bad1", {"input": "a"}), ("bad2", {"input": "a" * 50, "target": "b"}),
             ("bad3", {"input": "a", "target": "b" * 20}), ("bad4", {"input": "a", "target": "  "})]
    report = sft.Report()
    examples = seq2seq.build_examples(rows, _encode, EOS, seq_len=32, target_len=16, report=report)
    assert report.used == 60 and sum(report.bad.values()) == 4
    packed = seq2seq.pack(examples, 32, 16, start=7)
    assert len(packed["inputs"]) < 60  # several examples share a row pair
    found = []
    for r in range(len(packed["inputs"])):
        for s in range(1, packed["segment_ids"][r].max() + 1):
            enc, dec = packed["segment_ids"][r] == s, packed["decoder_segment_ids"][r] == s
            inputs, targets = packed["inputs"][r][enc], packed["targets"][r][dec]
            np.testing.assert_array_equal(packed["positions"][r][enc], np.arange(enc.sum()))
            np.testing.assert_array_equal(packed["decoder_inputs"][r][dec], np.concatenate([[7], targets[:-1]]))
            assert packed["loss_mask"][r][dec].all() and inputs[-1] == targets[-1] == EOS
            found.append((tuple(inputs), tuple(targets)))
        assert not packed["loss_mask"][r][packed["decoder_segment_ids"][r] == 0].any()
    assert sorted(found) == sorted((tuple(i), tuple(t)) for i, t in examples)


def test_first_fit_pairs_respects_both_capacities():
    rng = np.random.default_rng(1)
    a, b = rng.integers(1, 20, 200), rng.integers(1, 9, 200)
    bins = packing.first_fit_pairs(a, b, 20, 8)
    for k in range(bins.max() + 1):
        assert a[bins == k].sum() <= 20 and b[bins == k].sum() <= 8
    unpacked = seq2seq.pack([(np.ones(3, np.int32), np.ones(2, np.int32))] * 5, 8, 4, pack_rows=False)
    assert len(unpacked["inputs"]) == 5


def _pairs_file(path, n=160):
    rng = np.random.default_rng(0)
    words = "the lord said unto moses and aaron speak children israel house day night land".split()
    with open(path, "w") as f:
        for _ in range(n):
            sentence = [words[i] for i in rng.integers(0, len(words), rng.integers(2, 6))]
            f.write(json.dumps({"input": "reverse: " + " ".join(sentence), "target": " ".join(sentence[::-1])}) + "\n")
    return str(path)


def _cli(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def t5_base(tmp_path_factory):
    """A tiny T5 pretrained for a few span-corruption steps on the Bible: the base to finetune."""
    root = tmp_path_factory.mktemp("t5")
    run = _cli("train", "t5_tiny", "model.d_model=64", "model.num_layers=2", "model.mlp_dim=128", "model.vocab_size=512",
               "train.seq_len=64", "train.steps=2", "train.batch_size=8", "train.progress=False",
               f"train.run_dir={root / 'base'}", f"data.cache_dir={root / 'cache'}")
    assert run.returncode == 0, run.stderr[-3000:]
    return root


@pytest.mark.slow  # a T5 pretrained for 2 steps, then finetuned and evaluated through the CLI (~35 s each)
@pytest.mark.parametrize("lora", [False, True])
def test_seq2seq_finetune_learns_and_eval_scores_the_targets(t5_base, lora, tmp_path):
    """`jaxlm finetune task=sft` on {"input", "target"} JSONL trains an encoder-decoder (fully or with LoRA
    on its self- and cross-attention); `jaxlm eval --task targets:FILE` then reports the targets' perplexity,
    lower than the base's."""
    data = _pairs_file(tmp_path / "pairs.jsonl")
    base = t5_base / "base"
    extra = ['lora.targets=("attn/(q|v)$", "cross/(q|v)$")', "lora.rank=8", "optim.lr=1e-2"] if lora else ["optim.lr=3e-3"]
    run = _cli("finetune", str(base / "config.json"), "task=sft", f"model.init_from={base}", f"finetune.data={data}",
               "train.steps=40", "train.batch_size=8", "train.seq_len=48", "objective.target_len=24", "train.log_every=10",
               "train.eval_every=40", "optim.warmup_steps=2", "train.progress=False", f"train.run_dir={tmp_path / 'ft'}",
               *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = re.search(r"eval loss ([\d.]+) -> ([\d.]+)", run.stdout).groups()
    assert float(after) < float(before) - 1.0
    scores = {}
    for name, directory in (("base", base), ("finetuned", tmp_path / "ft")):
        out = _cli("eval", str(directory), "--task", f"targets:{data}", "--limit", "40")
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout)["results"][f"targets:{data}"]
        assert result["examples"] == 40 and result["tokens"] > 40
        scores[name] = result["perplexity"]
    assert scores["finetuned"] < scores["base"] / 2
    refused = _cli("eval", str(base))  # no --task: an encoder-decoder has no held-out text perplexity
    assert refused.returncode != 0 and "pass --task targets:FILE.jsonl" in refused.stderr
    if not lora:
        _exported_generates_the_same(tmp_path / "ft", tmp_path / "hf")


def _exported_generates_the_same(run, out):
    """`jaxlm convert to-hf` of a T5 jaxlm pretrained (its own sentencepiece tokenizer): transformers'
    tokenizer and greedy `generate` give jaxlm generate's text."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    converted = _cli("convert", "to-hf", str(run), str(out))
    assert converted.returncode == 0 and "AutoModelForSeq2SeqLM" in converted.stdout, converted.stderr[-2000:]
    prompt = "reverse: lord moses day"
    ours = _cli("generate", str(run), "--prompt", prompt, "--max-new-tokens", "8")
    assert ours.returncode == 0, ours.stderr[-2000:]
    tok, model = AutoTokenizer.from_pretrained(str(out)), AutoModelForSeq2SeqLM.from_pretrained(str(out))
    ids = tok(prompt, return_tensors="pt").input_ids
    theirs = tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0], skip_special_tokens=True)
    assert ours.stdout.strip() == theirs.strip() and theirs.strip()
