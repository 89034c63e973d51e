"""DPO: the loss and its gradients against a direct computation, and training raises the preference margin."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from jaxlm import cli
from jaxlm.data import chat
from jaxlm.model.transformer import Transformer
from jaxlm.training import dpo, sft
from jaxlm.training.step import means

BETA = 0.5
PAIRS = [{"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."},
         {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
          "chosen": "Hello, friend!", "rejected": "Go away.", "ref_chosen_logp": -80.0, "ref_rejected_logp": -50.5}]


def encode(text):
    return list(text.encode("utf-8"))


def _direct_loss(model, params, template, refs):
    """-log sigmoid(beta * margin), each sequence run alone (no padding), log-probs from log_softmax."""
    losses = []
    for row, (ref_c, ref_r) in zip(PAIRS, refs):
        msgs = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        prompt_len = len(encode(template.render(msgs, add_generation_prompt=True)))
        logp = {}
        for side in ("chosen", "rejected"):
            tokens = jnp.asarray(encode(template.render(msgs + [{"role": "assistant", "content": row[side]}])))
            logits = model.apply({"params": params}, tokens[None, :-1])[0]
            token_logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], axis=-1)[:, 0]
            logp[side] = token_logp[prompt_len - 1:].sum()  # targets from the first response token on
        losses.append(-jax.nn.log_sigmoid(BETA * ((logp["chosen"] - ref_c) - (logp["rejected"] - ref_r))))
    return jnp.mean(jnp.stack(losses))


@pytest.mark.slow  # two compiled value-and-grads of the DPO objective (~45 s on 2 cores)
def test_dpo_loss_and_gradients_match_a_direct_computation():
    config = small_config(vocab_size=256, max_seq_len=128, num_layers=1)
    model = Transformer(config.model)
    template = chat.Template(chat.CHATML)
    report = sft.Report()
    rows = dpo.build_rows([(str(i), r) for i, r in enumerate(PAIRS)], template, encode, seq_len=128, report=report)
    assert report.used == 2 and np.isnan(rows["ref_chosen"][0]) and rows["ref_chosen"][1] == -80.0
    params = jax.jit(model.init)(jax.random.key(0), rows["chosen_inputs"][:, :8])["params"]
    # The first pair's reference is the frozen starting model; the second brings its own.
    assert dpo.fill_reference(model.apply, params, rows, batch_size=2, progress=False) == 1
    start = jax.jit(lambda p: _direct_loss(model, p, template, [(0.0, 0.0), (0.0, 0.0)]))(params)
    ref0 = jax.device_get(dpo.sequence_logps(model.apply, params, {k: v[:1] for k, v in rows.items()}))
    np.testing.assert_allclose(rows["ref_chosen"][0], ref0["chosen"][0], rtol=1e-6)
    assert np.isfinite(start)

    # Perturb the params so the policy differs from the reference, then compare with the direct computation.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    policy = jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    refs = list(zip(rows["ref_chosen"].tolist(), rows["ref_rejected"].tolist()))
    objective = dpo.objective(model.apply, BETA)

    def mean_loss(p):  # the objective's sums over the pairs, as means
        value, sums = objective.loss(p, rows, None)
        return value / sums["weight"], means(sums)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(policy)
    want, want_grads = jax.jit(jax.value_and_grad(lambda p: _direct_loss(model, p, template, refs)))(policy)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    # float32 sums of ~30 token log-probs: compare each gradient to a thousandth of its leaf's largest entry.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * np.abs(b).max()), grads, want_grads)
    # The reported rewards are beta * (policy - reference) log-probs, and accuracy counts positive margins.
    logp = dpo.sequence_logps(model.apply, policy, rows)
    reward_c = BETA * (np.asarray(logp["chosen"]) - rows["ref_chosen"])
    reward_r = BETA * (np.asarray(logp["rejected"]) - rows["ref_rejected"])
    np.testing.assert_allclose(metrics["margin"], np.mean(reward_c - reward_r), rtol=1e-5)
    np.testing.assert_allclose(metrics["reward_accuracy"], np.mean(reward_c > reward_r))


@pytest.mark.slow  # the whole `jaxlm finetune` DPO run: tokenizer, reference pass, compile, 10 steps
def test_jaxlm_finetune_dpo_raises_the_margin(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    pairs = [("What is two plus two?", "Four.", "Five, I think."), ("Say hello.", "Hello!", "No."),
             ("Name a colour.", "Blue.", "A number."), ("Is fire hot?", "Yes.", "It is cold.")]
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs * 8))
    argv = ["finetune", "dpo_tiny", f"finetune.data={data}", f"train.run_dir={tmp_path}/run", "train.steps=10",
            "train.seq_len=96", "train.batch_size=8", "train.progress=False", "finetune.drop_repeats=False",
            "model.vocab_size=384",
            "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1", "model.mlp_dim=64",
            "optim.lr=1e-2", "optim.warmup_steps=1", "data.eval_fraction=0.25", f"data.cache_dir={tmp_path}/cache"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    summary = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [s for s in summary if "eval/margin" in s]
    # Held-out pairs: the reference is the starting model, so training starts at margin 0 (loss log 2).
    assert "eval loss 0.6931 ->" in out, out
    assert evals[-1]["eval/margin"] > 0.1 and evals[-1]["eval/reward_accuracy"] == 1.0, out
    assert evals[-1]["eval/loss"] < 0.65

    # finetune.reference=RUN: the finished run (its merged model) is the reference, so the same starting policy
    # now begins with the held-out pairs preferred less than by the reference: a negative margin.
    argv = [a for a in argv if not a.startswith(("train.run_dir=", "train.steps="))]
    assert cli.main(argv + [f"train.run_dir={tmp_path}/second", "train.steps=1", f"finetune.reference={tmp_path}/run",
                            "finetune.save_merged=False"]) == 0
    first = [json.loads(line) for line in open(tmp_path / "second" / "metrics.jsonl") if "eval/margin" in line][0]
    assert first["step"] == 0 and first["eval/margin"] < -0.1 and first["eval/loss"] > 0.7, first
