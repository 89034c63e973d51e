"""Reward models: the Bradley-Terry objective and its gradients against a direct per-sequence computation,
sharded against one device, a language model's head swapped for a score head, and `jaxlm finetune
reward_tiny` from a language-model run (LoRA and full) raising held-out pair accuracy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import quick_jit, small_config

from jaxlm import cli
from jaxlm.core import mesh as mesh_lib
from jaxlm.core.config import ConfigError, MeshConfig, validate
from jaxlm.core.sharded_init import boxed_params, strip_boxes
from jaxlm.core.sharding import global_batch, tree_shardings
from jaxlm.data import chat
from jaxlm.model.transformer import Transformer
from jaxlm.training import reward, sft
from jaxlm.training.step import means

PAIRS = [{"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."},
         {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
          "chosen": "Hello, friend!", "rejected": "Go away, you."},
         {"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five, I believe."},
         {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A number, seven."}]


def encode(text):
    return list(text.encode("utf-8"))


def _model():
    import dataclasses

    c = small_config(vocab_size=256, max_seq_len=128, num_layers=2)
    return Transformer(dataclasses.replace(c.model, num_labels=1))


def _rows():
    report = sft.Report()
    rows = reward.build_rows([(str(i), r) for i, r in enumerate(PAIRS)], chat.Template(chat.CHATML), encode, 128, report)
    assert report.used == len(PAIRS)
    return rows


def _direct_loss(model, params):
    """Mean -log sigmoid(r_chosen - r_rejected), each conversation run alone, its reward at its last token."""
    template, losses = chat.Template(chat.CHATML), []
    for row in PAIRS:
        msgs = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        r = {}
        for side in ("chosen", "rejected"):
            tokens = jnp.asarray(encode(template.render(msgs + [{"role": "assistant", "content": row[side]}])))
            r[side] = model.apply({"params": params}, tokens[None])[0, -1, 0]
        losses.append(-jax.nn.log_sigmoid(r["chosen"] - r["rejected"]))
    return jnp.mean(jnp.stack(losses))


def test_bradley_terry_loss_and_gradients_match_a_direct_computation():
    model, rows = _model(), _rows()
    params = strip_boxes(jax.jit(model.init)(jax.random.key(0), rows["chosen_inputs"][:, :8])["params"])
    assert set(params) == {"embed", "final_norm", "layers", "score"} and params["score"].shape == (1, 32)
    objective = reward.objective(model.apply)

    def mean_loss(p):
        value, sums = objective.loss(p, rows, None)
        return value / sums["weight"], means(sums)

    (loss, metrics), grads = quick_jit(jax.value_and_grad(mean_loss, has_aux=True), params)(params)
    want, want_grads = quick_jit(jax.value_and_grad(lambda p: _direct_loss(model, p)), params)(params)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()), grads, want_grads)
    r = reward.scores(model.apply, params, rows)
    margin = np.asarray(r["chosen"] - r["rejected"])
    np.testing.assert_allclose(metrics["accuracy"], np.mean(margin > 0))
    np.testing.assert_allclose(metrics["margin"], np.mean(margin), rtol=1e-5, atol=1e-6)


def test_sharded_reward_loss_and_gradients_equal_one_device():
    model, rows = _model(), _rows()
    params = strip_boxes(jax.jit(model.init)(jax.random.key(0), rows["chosen_inputs"][:, :8])["params"])
    objective = reward.objective(model.apply)
    grad_fn = jax.value_and_grad(lambda p, b: objective.loss(p, b, None)[0])
    want, want_grads = quick_jit(grad_fn, params, rows)(params, rows)
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        batch = global_batch(rows, mesh)
        sharded = jax.device_put(params, tree_shardings(boxed_params(model), mesh))  # fsdp x tensor, by the rules
        assert not sharded["score"].sharding.is_fully_replicated
        got, got_grads = jax.jit(grad_fn)(sharded, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_grads, want_grads)


def test_task_and_head_must_agree():
    import dataclasses

    c = small_config()
    with pytest.raises(ConfigError, match="a reward model \\(task=reward\\) has model.num_labels=1"):
        validate(dataclasses.replace(c, task="reward"))
    with pytest.raises(ConfigError, match="num_labels=1"):
        validate(dataclasses.replace(c, model=dataclasses.replace(c.model, num_labels=1)))


def _prefs(tmp_path):
    """Chosen answers that answer, rejected ones that refuse rudely: a preference learnable from the text."""
    import random

    rng = random.Random(0)
    facts = [("What colour is the sky?", "Blue."), ("What is two plus two?", "Four."), ("Say hello.", "Hello!"),
             ("Is fire hot?", "Yes, very."), ("Name a fruit.", "An apple."), ("What do cows drink?", "Water."),
             ("Where is Paris?", "In France."), ("How many legs has a cat?", "Four legs.")]
    rows = []
    for _ in range(6):
        for i, (q, a) in enumerate(facts):
            wrong = rng.choice(["No idea, go away.", "Stop asking me things.", "Why would I tell you?",
                                "Not my problem.", "Ask someone else, I refuse."])
            rows.append({"prompt": q, "chosen": a, "rejected": wrong})
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in facts * 12))


SMALL = ["model.vocab_size=384", "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.mlp_dim=64", "train.seq_len=128", "train.batch_size=8", "train.progress=False",
         "finetune.drop_repeats=False"]


@pytest.mark.slow  # three `jaxlm finetune` runs (an SFT base, then a LoRA and a full reward model): ~60 s
def test_reward_model_from_a_language_model_run(tmp_path, capsys):
    _prefs(tmp_path)
    base = str(tmp_path / "lm")
    assert cli.main(["finetune", "sft_tiny", f"finetune.data={tmp_path}/sft.jsonl", f"train.run_dir={base}",
                     "train.steps=4", "lora.targets=()", "finetune.pack=False", f"data.cache_dir={tmp_path}/cache", *SMALL]) == 0
    for name, extra in (("lora", []), ("full", ["lora.targets=()"])):
        capsys.readouterr()
        run = tmp_path / name
        assert cli.main(["finetune", "reward_tiny", f"finetune.data={tmp_path}/prefs.jsonl", f"train.run_dir={run}",
                         f"model.init_from={base}", "train.steps=30", "optim.lr=3e-3", "optim.warmup_steps=2",
                         "data.eval_fraction=0.25", *extra, *SMALL[-4:]]) == 0
        out = capsys.readouterr().out
        evals = [json.loads(line) for line in open(run / "metrics.jsonl") if "eval/accuracy" in line]
        assert evals[0]["step"] == 0 and evals[-1]["eval/accuracy"] >= 0.8, (name, evals)
        assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.2, (name, evals)
        assert "held-out pair accuracy" in out and "jaxlm generate" not in out
    assert cli.main(["generate", str(tmp_path / "full"), "--prompt", "hi"]) == 2
    assert "is a reward model (model.num_labels=1)" in capsys.readouterr().err


@pytest.mark.slow  # a reward run from a Hugging Face causal LM, then its export scored by transformers: ~40 s
def test_reward_model_from_hugging_face_exports_with_score_parity(tmp_path):
    """model.init_from=hf:DIR of a LlamaForCausalLM: its lm_head gives way to a fresh score head; the trained
    reward model exports as LlamaForSequenceClassification whose logits equal jaxlm's score at the last token."""
    import dataclasses

    import torch
    from hf_models import save_model, save_tokenizer
    from transformers import AutoModelForSequenceClassification

    from jaxlm.inference.load import load_run

    src = str(tmp_path / "hf")
    save_model("llama", src, config={"vocab_size": 128, "hidden_size": 24, "num_attention_heads": 3,
                                     "num_key_value_heads": 1, "num_hidden_layers": 2, "intermediate_size": 40,
                                     "max_position_embeddings": 128})
    save_tokenizer(src, vocab_size=128, fill=True)
    _prefs(tmp_path)
    run, out = tmp_path / "run", str(tmp_path / "out")
    assert cli.main(["finetune", "reward_tiny", f"finetune.data={tmp_path}/prefs.jsonl", f"train.run_dir={run}",
                     f"model.init_from=hf:{src}", "model.dtype=float32", "model.attention=xla", "train.steps=3",
                     "lora.targets=()", "train.seq_len=96", "train.batch_size=8", "train.progress=False"]) == 0
    assert cli.main(["convert", "to-hf", str(run), out, "--dtype", "float32"]) == 0
    loaded = load_run(str(run), language_model=False)
    assert "lm_head" not in loaded.params and loaded.params["score"].shape == (1, 24)
    tokens = np.asarray(loaded.tokenizer.encode("hello how are you today"), np.int32)[None]
    model = Transformer(dataclasses.replace(loaded.config.model, scan_layers=True))
    ours = np.asarray(model.apply({"params": loaded.params}, tokens))[0, -1, 0]
    hf = AutoModelForSequenceClassification.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens, dtype=torch.long)).logits[0, 0].item()
    assert abs(ours - theirs) < 1e-4, (ours, theirs)
