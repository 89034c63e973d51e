"""Evaluation: the scorer against direct log-softmax sums, perplexity and bits-per-byte, multiple choice,
the lm-evaluation-harness adapter against jaxlm's own scorer, and the code sandbox."""

import json
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from jaxlm.core.config import ConfigError
from jaxlm.evaluation import humaneval, multiple_choice, perplexity
from jaxlm.evaluation.sandbox import run_python
from jaxlm.inference.generate import Generator, SamplingConfig, complete
from jaxlm.inference.scoring import Scorer, encode_pair
from jaxlm.model.transformer import Transformer


class CharTokenizer:
    """Printable ASCII as its own code point; enough for exact, readable scoring tests."""

    def bos_id(self):
        return 1

    def eos_id(self):
        return 2

    def encode(self, text):
        return [ord(c) if 32 <= ord(c) < 127 else 3 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i >= 32)


@pytest.fixture(scope="module")
def model_params():
    model = Transformer(small_config().model)
    params = nn.unbox(model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32)))["params"]
    return model, params


@jax.jit
def _log_softmax_forward(params, tokens):
    return jax.nn.log_softmax(Transformer(small_config().model).apply({"params": params}, tokens), axis=-1)


def direct_logprob(model, params, context, continuation):
    """Sum of log p(continuation | context) from one full forward pass, right-padded to the context length
    (causal attention: padding after a position does not change it), so that one program serves all."""
    inputs = (context + continuation)[:-1]  # the last token is only predicted
    tokens = np.zeros((1, model.config.max_seq_len), np.int32)
    tokens[0, :len(inputs)] = inputs
    logp = np.asarray(_log_softmax_forward(params, tokens))[0]
    n = len(context)
    return sum(float(logp[n - 1 + i, t]) for i, t in enumerate(continuation))


def test_scorer_matches_direct_log_softmax(model_params):
    model, params = model_params
    requests = [([1, 40, 41], [42]), ([1], [50, 51, 52, 53]), ([1, *range(60, 90)], [7, 8]), ([1, 5], [9])]
    scores = Scorer(model, params, batch_size=3).loglikelihood(requests)  # 2 batches, one padded
    for (context, continuation), score in zip(requests, scores):
        assert score.logprob == pytest.approx(direct_logprob(model, params, context, continuation), abs=1e-4)
        assert score.num_tokens == len(continuation)


def test_is_greedy_flags_the_argmax_continuation(model_params):
    model, params = model_params
    context = [1, 33, 34]
    logits = _log_softmax_forward(params, jnp.asarray([context + [0] * 61], jnp.int32))[0, 2]
    best, worst = int(jnp.argmax(logits)), int(jnp.argmin(logits))
    scores = Scorer(model, params).loglikelihood([(context, [best]), (context, [worst])])
    assert scores[0].is_greedy and not scores[1].is_greedy


def test_rolling_windows(model_params):
    model, params = model_params
    short = [1, *range(40, 70)]
    scorer = Scorer(model, params)
    assert scorer.rolling(short).logprob == pytest.approx(direct_logprob(model, params, short[:1], short[1:]), abs=1e-4)
    long = [1, *np.random.default_rng(0).integers(4, 120, 150).tolist()]  # 3 windows of the 64-token context
    expected = sum(direct_logprob(model, params, long[s:s + 1], long[s + 1:s + 65]) for s in range(0, 150, 64))
    score = scorer.rolling(long)
    assert score.num_tokens == 150 and score.logprob == pytest.approx(expected, abs=1e-3)


def test_perplexity_and_bits_per_byte(model_params):
    model, params = model_params
    tok, texts = CharTokenizer(), ["In the beginning", "God created the heaven and the earth."]
    result = perplexity.perplexity(Scorer(model, params), tok, texts, progress=False)
    nll = -sum(direct_logprob(model, params, [1], tok.encode(t)) for t in texts)
    assert result["tokens"] == sum(len(t) for t in texts)
    assert result["perplexity"] == pytest.approx(math.exp(nll / result["tokens"]), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(len(t) for t in texts), rel=1e-4)


def test_encode_pair_moves_trailing_space_to_the_continuation():
    context, continuation = encode_pair(CharTokenizer(), "Question: 2+2 = ", "4")
    assert context == [1, *CharTokenizer().encode("Question: 2+2 =")] and continuation == [32, ord("4")]


def test_multiple_choice_accuracy(model_params, tmp_path):
    model, params = model_params
    tok, scorer = CharTokenizer(), Scorer(model, params)
    questions = [{"context": "ab", "choices": ["c", "dd", "e"], "answer": a} for a in range(3)]
    result = multiple_choice.evaluate(scorer, tok, questions)
    lls = [direct_logprob(model, params, [1, *tok.encode("ab")], tok.encode(c)) for c in ["c", "dd", "e"]]
    best, best_norm = int(np.argmax(lls)), int(np.argmax([ll / len(c) for ll, c in zip(lls, ["c", "dd", "e"])]))
    assert result["acc"] == pytest.approx(1 / 3) and result["questions"] == 3
    assert result["acc_norm"] == pytest.approx(1 / 3)
    assert multiple_choice.evaluate(scorer, tok, [questions[best]])["acc"] == 1.0
    assert multiple_choice.evaluate(scorer, tok, [questions[best_norm]])["acc_norm"] == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(questions[0]) + "\n" + json.dumps({"context": "x", "choices": ["a"], "answer": 0}) + "\n")
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        multiple_choice.load_task(str(bad))


def test_harness_adapter_equals_jaxlm_scorer(model_params):
    from lm_eval.api.instance import Instance

    from jaxlm.evaluation.harness import JaxlmLM
    from jaxlm.inference.load import LoadedRun

    model, params = model_params
    tok = CharTokenizer()
    lm = JaxlmLM(loaded=LoadedRun(small_config(), model, params, tok, 0), batch_size=4)
    pairs = [("The capital of France is", " Paris"), ("1 2 3", " 4 5"), ("x", "y")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    want = Scorer(model, params).loglikelihood([encode_pair(tok, c, x) for c, x in pairs])
    assert [g[0] for g in got] == pytest.approx([w.logprob for w in want], abs=1e-5)
    assert [g[1] for g in got] == [w.is_greedy for w in want]
    for (c, x), g in zip(pairs, got):  # and against the direct computation
        ctx, cont = encode_pair(tok, c, x)
        assert g[0] == pytest.approx(direct_logprob(model, params, ctx, cont), abs=1e-4)
    text = "a rolling document " * 5
    rolled = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolled[0] == pytest.approx(Scorer(model, params).rolling([1, *tok.encode(text)]).logprob, abs=1e-5)
    gen = lm.generate_until([Instance("generate_until", {}, ("Once upon", {"until": ["\n"], "max_gen_toks": 6}), 0),
                             Instance("generate_until", {}, ("a", {"until": ["zz"], "max_gen_toks": 6}), 1)])
    expected = complete(Generator(model, params, SamplingConfig(max_new_tokens=6)), tok, ["Once upon", "a"])
    assert gen == [e.split("\n")[0] for e in expected[:1]] + [expected[1].split("zz")[0]]


def test_sandbox_pass_fail_and_isolation():
    assert run_python("import os\nassert os.getcwd().startswith('/tmp')\n").passed
    failed = run_python("raise ValueError('boom')")
    assert not failed.passed and "ValueError: boom" in failed.output
    assert run_python(f"import os\nassert os.getpid() != {os.getpid()}").passed


def test_sandbox_kills_the_program_and_its_children_at_the_timeout(tmp_path):
    marker = tmp_path / "child.pid"
    program = ("import subprocess, sys, time\n"
               f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
               f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
               "time.sleep(60)\n")
    start = time.monotonic()
    outcome = run_python(program, timeout=3)
    assert outcome.timed_out and not outcome.passed and time.monotonic() - start < 15
    child = int(marker.read_text())
    time.sleep(0.5)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited, only its parent has not reaped it
    except FileNotFoundError:
        return False


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = humaneval.problems()
    assert len(problems) == 164
    subset = problems[:6]
    canonical = {p["prompt"]: p["canonical_solution"] for p in subset}
    result = humaneval.evaluate(lambda prompts: [canonical[p] for p in prompts], subset, progress=False)
    assert result["pass@1"] == 1.0
    wrong = humaneval.evaluate(lambda prompts: ["    return None\n"] * len(prompts), subset, progress=False)
    assert wrong["pass@1"] == 0.0
    assert humaneval.truncate("    return x\n\ndef other():\n    pass") == "    return x\n"


@pytest.mark.slow  # the harness indexes its few thousand built-in task files first (about a minute)
def test_lm_eval_runs_a_local_task_through_the_adapter(model_params, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from jaxlm.evaluation.harness import JaxlmLM
    from jaxlm.inference.load import LoadedRun

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, params = model_params
    questions = [{"context": "In the beginning God created the", "choices": [" heaven", " sea", " dust"], "answer": a}
                 for a in range(3)] + [{"context": "Jesus", "choices": [" wept", " went"], "answer": 1}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "task.yaml").write_text(
        f"task: jaxlm_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ntarget_delimiter: ''\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n")
    lm = JaxlmLM(loaded=LoadedRun(small_config(), model, params, CharTokenizer(), 0))
    out = lm_eval.simple_evaluate(model=lm, tasks=["jaxlm_local_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    ours = multiple_choice.evaluate(Scorer(model, params), CharTokenizer(), questions)
    assert out["results"]["jaxlm_local_mc"]["acc,none"] == pytest.approx(ours["acc"])


@pytest.mark.slow  # perplexity at three formats (~20 s); quantized logits are checked by default in test_quantize.py
def test_quantization_report(model_params):
    from jaxlm.evaluation import quantization
    from jaxlm.model import quantize as Q

    model, params = model_params
    texts = ["In the beginning God created the heaven and the earth.", "And the earth was without form."]
    rows = quantization.report(model, params, CharTokenizer(), texts, ("int8", "int4"), block_size=32, progress=False)
    assert rows["float"]["param_bytes"] == Q.nbytes(params)
    for fmt in ("int8", "int4"):
        assert rows[fmt]["param_bytes"] == Q.nbytes(Q.quantize_params(params, fmt, 32)) < Q.nbytes(params)
        assert rows[fmt]["memory_saved"] == pytest.approx(1 - rows[fmt]["param_bytes"] / rows["float"]["param_bytes"])
        assert rows[fmt]["bytes"] == rows["float"]["bytes"] == sum(len(t) for t in texts)  # text scored
    assert abs(rows["int8"]["perplexity_change"]) < 0.01 and rows["int8"]["top1_agreement"] > 0.9
    assert rows["int8"]["logits_max_abs_diff"] < rows["int4"]["logits_max_abs_diff"]
