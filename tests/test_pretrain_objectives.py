"""Pretraining objectives through `jaxlm train` on the built-in Bible: decoder-only span corruption with
prefix-LM attention, BERT's masked LM and T5's span corruption learn (the loss falls), and an objective that
does not fit the architecture is one line."""

import subprocess
import sys

import pytest
from test_train import SMALL, jaxlm_train, losses


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))

SHORT = ["train.steps=12", "train.log_every=1", "train.eval_every=12", "optim.warmup_steps=2", "train.progress=False",
         "train.batch_size=8", "train.seq_len=64", "train.eval_batches=1", "model.vocab_size=512"]


@pytest.mark.parametrize("args, made", [
    pytest.param(SMALL + ["train.steps=12", "objective.kind=span_corruption", "objective.prefix_lm=True"],
                 "made into span_corruption rows of 64 tokens", marks=pytest.mark.slow),  # each run ~15 s
    pytest.param(["bert_tiny", "model.d_model=64", "model.num_layers=2", "model.mlp_dim=128", "model.max_seq_len=64",
                  *SHORT], "made into mlm rows of 64 tokens", marks=pytest.mark.slow),
    (["t5_tiny", "model.d_model=64", "model.num_layers=2", "model.mlp_dim=128", "model.max_seq_len=64", *SHORT],
     "made into span_corruption rows of 64 input and"),
], ids=["decoder_span_corruption", "bert_mlm", "t5_span_corruption"])
def test_objective_trains_on_the_bible(args, made, tmp_path, cache_dir):
    run = jaxlm_train(args, tmp_path / "run", cache_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert made in run.stderr
    loss = losses(tmp_path / "run")
    assert sorted(loss) == list(range(1, 13)) and loss[12] < loss[1] - 0.1


@pytest.mark.parametrize("args, message", [
    (["tiny", "objective.kind=span_corruption"], "objective.kind=span_corruption on a decoder-only model needs prefix-LM"),
    (["tiny", "objective.kind=mlm"], "objective.kind=mlm needs an encoder (model.architecture=bert)"),
    (["bert_tiny", "objective.kind=causal"], "model.architecture=bert is an encoder: it trains with objective.kind=mlm"),
    (["t5_tiny", "objective.kind=prefix_lm"], "objective.kind=prefix_lm is for decoder-only models"),
    (["tiny", "objective.kind=prefix_lm", "mesh.sequence=2"], "context parallelism (mesh.sequence)"),
    (["tiny", "model.mlp_activation=relu"], "model.mlp_activation=relu is not available to model.architecture=llama"),
    (["bert_tiny", "model.mlp_activation=gated_silu"], "choose auto or one of gelu, gelu_tanh, relu"),
    (["t5_tiny", "model.decoder_start_id=9000"], "model.decoder_start_id=9000 is not a token of the vocabulary"),
])
def test_an_objective_that_does_not_fit_is_one_line(args, message):
    run = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", *args], capture_output=True, text=True,
                         timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert run.returncode != 0
    lines = [line for line in run.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0], run.stderr
